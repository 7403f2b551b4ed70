"""cl/engine/model_cache.py: a killed first build of a cached model resumes from its partial state (atomic, beside the
cache file) and ends with the same weights as an uninterrupted build."""
import pytest
import torch

from cl.engine.model_cache import BuildCheckpoint, cache_file, cached_weights, partial_file

pytestmark = pytest.mark.unit

STEPS = 12


class Killed(Exception):
    """Stands for SIGKILL / Ctrl-C twice: the build stops between two steps, nothing is cleaned up."""


def toy_train(log: list, kill_at: int | None = None):
    """A resumable `train`: SGD on a linear model with a fresh global-RNG draw per step (as dropout would)."""

    def train(checkpoint):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        first = 0
        saved = checkpoint.load()
        if saved is not None:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            torch.set_rng_state(saved["torch_rng"])
            first = saved["step"]
        for step in range(first, STEPS):
            if step > first and checkpoint.due():
                checkpoint.save({"step": step, "model": model.state_dict(), "opt": opt.state_dict(),
                                 "torch_rng": torch.get_rng_state()})
            if step == kill_at:
                raise Killed(step)
            log.append(step)
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.state_dict()

    return train


def test_a_killed_build_resumes_where_it_was_saved_with_the_same_weights(tmp_path):
    settings = {"toy": 1}
    ref_log, ref_path = [], None
    ref_path, _ = cached_weights(tmp_path / "ref", "toy", settings, toy_train(ref_log), checkpoint_every_s=0)
    assert ref_log == list(range(STEPS))

    log = []
    with pytest.raises(Killed):
        cached_weights(tmp_path / "c", "toy", settings, toy_train(log, kill_at=7), checkpoint_every_s=0)
    path, _ = cache_file(tmp_path / "c", "toy", settings)
    assert not path.exists() and partial_file(path).exists()  # no half cache file; the partial state is kept
    assert not list((tmp_path / "c").glob("*.tmp"))  # every save was atomic
    log.clear()
    path2, _ = cached_weights(tmp_path / "c", "toy", settings, toy_train(log), checkpoint_every_s=0)
    assert log == list(range(7, STEPS))  # resumed at the last saved step, not from 0
    assert not partial_file(path2).exists()  # removed once the weights are cached
    from cl.engine.model_cache import load_weights

    a, b = load_weights(ref_path), load_weights(path2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_unreadable_partial_build_is_ignored(tmp_path):
    settings = {"toy": 2}
    path, _ = cache_file(tmp_path, "toy", settings)
    partial_file(path).write_bytes(b"not a checkpoint")
    log = []
    with pytest.warns(UserWarning, match="unreadable partial build"):
        cached_weights(tmp_path, "toy", settings, toy_train(log), checkpoint_every_s=0)
    assert log == list(range(STEPS)) and path.exists()


def test_a_train_without_checkpoint_parameter_is_called_as_before(tmp_path):
    path, _ = cached_weights(tmp_path, "plain", {"x": 1}, lambda: {"w": torch.ones(2)})
    assert path.exists() and not partial_file(path).exists()


@pytest.mark.e2e
def test_the_tiny_vit_pretraining_resumes_exactly(tmp_path):
    """cl/app/testbeds/vit_warmup.py's loop (model, AdamW, one-cycle schedule, sampler and global RNGs), cut to a few
    steps: killed after its third checkpoint, resumed, it gives the uninterrupted build's weights bit for bit."""
    from cl.engine.model_cache import isolated_rng
    from cl.app.testbeds.vit_warmup import settings_of, warm_up

    cfg = {"arch": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2,
                                                      "num_heads": 2},
           "input_size": 32, "in_chans": 3, "warmup": {"n_classes": 4, "per_class": 4, "steps": 6, "batch_size": 4}}
    settings = settings_of(cfg)
    with isolated_rng(0):
        ref = warm_up(settings, progress=False)

    class KilledAfterThirdSave(BuildCheckpoint):
        def save(self, state):
            super().save(state)
            if self.saves == 3:
                raise Killed(state["step"])

    part = tmp_path / ".vit.partial.pt"
    with isolated_rng(0), pytest.raises(Killed):
        warm_up(settings, progress=False, checkpoint=KilledAfterThirdSave(part, every_s=0))
    assert torch.load(part, weights_only=True)["step"] == 3
    with isolated_rng(0):
        resumed = warm_up(settings, progress=False, checkpoint=BuildCheckpoint(part, every_s=0))
    assert ref.keys() == resumed.keys() and all(torch.equal(ref[k], resumed[k]) for k in ref)
