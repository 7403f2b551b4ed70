"""Reliability in-process: stop signals checkpoint mid-experience and resume exactly, a held run directory is refused,
a full disk or an unwritable results root is one line with nothing lost, unsafe pickles are refused, damaged images
follow `scenario.bad_images`, and the same config and seed give the same numbers.

The end-to-end checks through the real command (SIGKILL at random points, SIGTERM, two processes) are in
tests/test_reliability_cli.py; the config fuzzing is in tests/test_reliability_fuzz.py.
"""
import errno
import hashlib
import json
import os
import signal
from pathlib import Path

import pytest
import torch

import cl.engine.results as results
import cl.engine.trainer as trainer_module
from cl.engine.errors import BackboneError, DatasetError, ResultsError, RunInterrupted, RunLockedError
from cl.engine.results import RunDir, config_hash

pytestmark = pytest.mark.e2e

# 5 experiences x 2 epochs x 2 batches of 16 (debug=fast keeps 16 images per class, 2 classes per experience):
# training step s (1-based) is experience (s-1)//4, epoch ((s-1)//2)%2, batch (s-1)%2+1.
OVERRIDES = ["strategy=finetune", "scenario=synthetic", "debug=fast", "trainer.epochs=2"]


def run_dir(cfg) -> RunDir:
    return RunDir(cfg["results_root"], config_hash(cfg))


def final_state(cfg) -> dict:
    d = run_dir(cfg)
    return torch.load(d.checkpoint_files()[-1], weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """The reference: the same config, never interrupted (matrices and the final weights)."""
    from cl.app.cli import compose_config
    from cl.app.experiment import run_experiment

    root = tmp_path_factory.mktemp("unbroken")
    cfg = compose_config([*OVERRIDES, f"results_root={root}", "trainer.progress=false", "trainer.device=cpu"])
    path = run_experiment(cfg, out=lambda *a: None)
    return json.loads(path.read_text()), final_state(cfg)["strategy"]


def signal_at_steps(monkeypatch, sig, steps):
    """Sends `sig` to this process during the given training steps (1-based, counted per process start)."""
    original = trainer_module.Trainer._task_ids  # called once per training batch, before the step
    calls = {"n": 0}

    def sending(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] in steps:
            os.kill(os.getpid(), sig)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.Trainer, "_task_ids", sending)
    return calls


@pytest.mark.parametrize("sig, schedule", [
    # SIGTERM three times: mid-epoch; again 2 steps after resuming from that partial checkpoint (in the next
    # experience); then at the end of an epoch.
    pytest.param(signal.SIGTERM, [11, 2, 5], id="SIGTERM-three-times"),
    # SIGINT at the end of the first epoch (the resumed process starts with the scheduler step).
    pytest.param(signal.SIGINT, [2], id="SIGINT-epoch-end"),
    # SIGUSR2 (Slurm/submitit's warning before the time limit) on the very last training step.
    pytest.param(signal.SIGUSR2, [20], id="SIGUSR2-last-step"),
])
def test_stop_signal_checkpoints_mid_experience_and_resumes_exactly(compose, run_quiet, monkeypatch, unbroken,
                                                                    sig, schedule):
    reference, reference_state = unbroken
    cfg = compose(*OVERRIDES)
    d = run_dir(cfg)
    before = signal.getsignal(sig)  # SIG_IGN when the suite runs as a background job without job control
    for at in schedule:
        with monkeypatch.context() as m:
            signal_at_steps(m, sig, {at})
            with pytest.raises(RunInterrupted) as info:
                run_quiet(cfg)
        exc = info.value
        assert exc.signal_name == sig.name and exc.epoch is not None
        assert exc.checkpoint == str(d.partial_path) and d.partial_path.is_file()
        assert "run the same command to resume" in str(exc) and "\n" not in str(exc)
        partial = d.load_partial()
        assert partial["experience"] == exc.experience and partial["train"]["batch"] == exc.batch
        for key in ("optimizer", "scheduler", "rng", "loader_generator", "strategy", "epoch", "step"):
            assert key in partial["train"]
        result = json.loads(d.result_path.read_text())
        assert result["status"] == "interrupted" and result["interruption"]["signal"] == sig.name
        assert len(result["acc_matrix"]) == exc.experience  # the finished experiences are kept
        assert signal.getsignal(sig) == before  # the handler that was there before the run is restored

    path, lines = run_quiet(cfg)
    assert any("inside experience" in line for line in lines)
    result = json.loads(path.read_text())
    assert result["status"] == "finished" and result["interruption"] is None
    assert result["acc_matrix"] == reference["acc_matrix"]  # exactly, on CPU
    assert result["task_il_matrix"] == reference["task_il_matrix"]
    assert_same_state(final_state(cfg)["strategy"], reference_state)  # the weights too, bit for bit
    assert not d.partial_path.exists() and not d.partial_path.with_suffix(".sha256").exists()
    events = d.events()
    assert [e["experience"] for e in events if e["event"] == "experience_end"] == [0, 1, 2, 3, 4]
    assert sum(e["event"] == "run_interrupted" for e in events) == len(schedule)
    resumed = [e for e in events if e["event"] == "run_resumed"]
    assert len(resumed) == len(schedule) and all("batch" in e for e in resumed)
    epoch_ends = [(e["experience"], e["epoch"]) for e in events if e["event"] == "epoch_end"]
    assert epoch_ends == [(i, j) for i in range(5) for j in range(2)]  # every epoch once, none repeated


def test_a_stop_between_experiences_resumes_from_the_experience_checkpoint(compose, run_quiet, monkeypatch):
    """SimpleCIL does not train by SGD: the stop is honoured inside its pass over the data (a watched loader,
    cl/engine/progress.py), and the experience restarts from the previous experience's checkpoint."""
    from strategies.simplecil import SimpleCIL

    cfg = compose("strategy=simplecil", "scenario=synthetic", "debug=fast")
    reference, _ = run_quiet(compose("strategy=simplecil", "scenario=synthetic", "debug=fast",
                                     f"results_root={Path(cfg['results_root']).parent / 'ref'}"))
    original = SimpleCIL.fit_experience
    calls = {"n": 0}

    def fit_then_signal(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(SimpleCIL, "fit_experience", fit_then_signal)
        with pytest.raises(RunInterrupted) as info:
            run_quiet(cfg)
    assert info.value.epoch is None and info.value.experience == 1  # within the pass, not at its end
    assert info.value.phase == "feature extraction"  # SimpleCIL encodes its data through cl/engine/features.py
    assert not run_dir(cfg).partial_path.exists()
    path, lines = run_quiet(cfg)
    assert any("after experience 0" in line for line in lines)
    assert json.loads(path.read_text())["acc_matrix"] == json.loads(reference.read_text())["acc_matrix"]


def test_a_previous_python_handler_runs_after_the_checkpoint(compose, run_quiet, monkeypatch):
    """Under submitit, its SIGUSR2 hook (checkpoint and requeue) is chained once the state is on disk."""
    cfg = compose(*OVERRIDES)
    seen = []

    def submitit_like(signum, frame):
        seen.append((signum, run_dir(cfg).partial_path.is_file()))

    previous = signal.signal(signal.SIGUSR2, submitit_like)
    try:
        signal_at_steps(monkeypatch, signal.SIGUSR2, {4})
        with pytest.raises(RunInterrupted):
            run_quiet(cfg)
        assert seen == [(signal.SIGUSR2, True)]
        assert signal.getsignal(signal.SIGUSR2) is submitit_like  # restored
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_a_stale_or_foreign_partial_checkpoint_is_ignored(compose, run_quiet, monkeypatch, unbroken):
    cfg = compose(*OVERRIDES)
    signal_at_steps(monkeypatch, signal.SIGTERM, {4})
    with pytest.raises(RunInterrupted):
        run_quiet(cfg)
    monkeypatch.undo()
    d = run_dir(cfg)
    partial = d.load_partial()
    partial["experience"] = 3  # claims to continue an experience the run has not reached
    d.save_partial(partial)
    path, lines = run_quiet(cfg)
    assert any("ignoring checkpoints/partial.pt" in line for line in lines)
    assert json.loads(path.read_text())["acc_matrix"] == unbroken[0]["acc_matrix"]


# --- the lock ----------------------------------------------------------------------------------
@pytest.mark.unit
def test_a_second_holder_of_the_run_directory_is_refused(tmp_path):
    first, second = RunDir(tmp_path, "run"), RunDir(tmp_path, "run")
    first.create()
    first.lock()
    try:
        with pytest.raises(RunLockedError) as info:
            second.lock()
        message = str(info.value)
        assert f"pid {os.getpid()}" in message and "on host" in message and "wait for it" in message
        assert "\n" not in message
        RunDir(tmp_path, "other").create()
        RunDir(tmp_path, "other").lock()  # another run under the same root: no clash
    finally:
        first.unlock()
    second.lock()  # released: the next process gets it
    second.unlock()


def test_run_experiment_refuses_a_run_directory_in_use(compose, run_quiet):
    cfg = compose(*OVERRIDES)
    holder = run_dir(cfg)
    holder.create()
    holder.lock()
    try:
        with pytest.raises(RunLockedError, match="is in use by pid"):
            run_quiet(cfg)
    finally:
        holder.unlock()
    assert not holder.result_path.exists() and not holder.checkpoint_files()  # no work was done


# --- full disk, unwritable results root ---------------------------------------------------------
def test_a_full_disk_keeps_the_previous_result_and_checkpoints(compose, run_quiet, monkeypatch, unbroken):
    cfg = compose(*OVERRIDES)
    d = run_dir(cfg)
    run_quiet(compose(*OVERRIDES, "trainer.stop_after=2"))
    before = d.result_path.read_bytes()
    real = os.fsync
    full = {"on": False}

    def fsync(fd):  # the disk fills up while the third experience's checkpoint is written
        if "exp_002" in os.readlink(f"/proc/self/fd/{fd}"):
            full["on"] = True
        if full["on"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(results.os, "fsync", fsync)
    with pytest.raises(ResultsError) as info:
        run_quiet(cfg)
    monkeypatch.undo()
    message = str(info.value)
    assert "no space left on device" in message and "run the same command to resume" in message
    assert "\n" not in message and "exp_002.pt" in message
    assert d.result_path.read_bytes() == before  # the previous result, whole
    assert [p.name for p in d.checkpoint_files()] == ["exp_000.pt", "exp_001.pt"]
    assert d.load_latest_checkpoint()["next_experience"] == 2  # verified
    assert not list(d.path.rglob(".*.tmp"))  # no half-written temporaries
    path, _ = run_quiet(cfg)  # space freed: the same command finishes with the unbroken run's numbers
    assert json.loads(path.read_text())["acc_matrix"] == unbroken[0]["acc_matrix"]


def test_a_results_root_that_is_not_writable_fails_before_any_work(compose, run_quiet, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    built = []
    monkeypatch.setattr("scenarios.build", lambda *a, **k: built.append(1))
    with pytest.raises(ResultsError) as info:
        run_quiet(compose(*OVERRIDES, f"results_root={blocker / 'runs'}"))
    assert "not a writable folder" in str(info.value) and "results_root=" in str(info.value)
    assert "\n" not in str(info.value) and not built
    if os.geteuid() != 0:  # permission bits do not stop root
        locked = tmp_path / "read-only"
        locked.mkdir(mode=0o500)
        with pytest.raises(ResultsError, match="not a writable folder"):
            run_quiet(compose(*OVERRIDES, f"results_root={locked}"))


@pytest.mark.unit
def test_a_torn_event_line_does_not_swallow_the_next_event(tmp_path):
    d = RunDir(tmp_path, "run")
    d.create()
    d.log_event("experience_end", experience=0)
    with open(d.path / "events.jsonl", "a") as f:
        f.write('{"event": "experience_e')  # a kill or a full disk in the middle of a line
    d.log_event("experience_end", experience=1)
    assert [e["experience"] for e in d.events()] == [0, 1]


def test_a_kill_between_checkpoint_and_event_is_repaired_on_resume(compose, run_quiet):
    """SIGKILL after exp_000.pt is written but before its `experience_end` line: the resumed run writes it."""
    cfg = compose("strategy=simplecil", "scenario=synthetic", "debug=fast", "trainer.stop_after=1")
    run_quiet(cfg)
    d = run_dir(cfg)
    events = d.path / "events.jsonl"
    events.write_text("".join(line + "\n" for line in events.read_text().splitlines()
                              if '"experience_end"' not in line))
    cfg["trainer"]["stop_after"] = None
    run_quiet(cfg)
    ended = [e for e in d.events() if e["event"] == "experience_end"]
    assert sorted(e["experience"] for e in ended) == list(range(len(ended))) and len(ended) > 1
    assert ended[-1]["experience"] != 0 and [e.get("recovered") for e in ended if e["experience"] == 0] == [True]


def test_stale_temporaries_of_a_killed_writer_are_removed(compose, run_quiet):
    cfg = compose("strategy=simplecil", "scenario=synthetic", "debug=fast", "trainer.stop_after=1")
    d = run_dir(cfg)
    d.create()
    (d.ckpt_dir / ".exp_000.pt.abc123.tmp").write_bytes(b"half")
    (d.path / ".result.json.def456.tmp").write_text("{")
    _, lines = run_quiet(cfg)
    assert any("removed 2 temporary file(s)" in line for line in lines)
    assert not list(d.path.rglob(".*.tmp"))


# --- safe loading ------------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint or weights file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious(path: Path, marker: Path) -> bytes:
    torch.save({"next_experience": 1, "strategy": _Payload(marker)}, path)
    return path.read_bytes()


@pytest.mark.unit
def test_every_torch_load_in_the_engine_is_weights_only():
    root = Path(__file__).resolve().parent.parent
    calls = []
    for name in ("cl/models/backbones.py", "cl/engine/results.py"):
        for line in (root / name).read_text().splitlines():
            if "torch.load(" in line:
                calls.append((name, line))
                assert "weights_only=True" in line, (name, line)
    assert len(calls) >= 2


def test_a_malicious_checkpoint_is_refused_without_running_it(compose, run_quiet, tmp_path):
    marker = tmp_path / "pwned"
    cfg = compose("strategy=simplecil", "scenario=synthetic", "debug=fast")
    d = run_dir(cfg)
    d.create()
    for path in (d.checkpoint_path(3), d.partial_path):  # with a valid sha256: the checksum alone would pass it
        data = _malicious(path, marker)
        path.with_suffix(".sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    warnings = []
    assert d.load_latest_checkpoint(warn=warnings.append) is None
    assert d.load_partial(warn=warnings.append) is None
    assert len(warnings) == 2 and all("refused" in w for w in warnings)
    path, lines = run_quiet(cfg)  # the run starts over instead
    assert json.loads(path.read_text())["status"] == "finished"
    assert not marker.exists()


@pytest.mark.unit
def test_a_malicious_weights_file_is_refused_without_running_it(tmp_path):
    from cl.app.experiment import _build_backbone

    marker = tmp_path / "pwned"
    weights = tmp_path / "weights.pth"
    _malicious(weights, marker)
    cfg = {"name": "vit-tiny", "source": "timm", "arch": "vit_tiny_patch16_224", "input_size": 32,
           "kwargs": {"img_size": 32, "patch_size": 4}, "weights": str(weights), "normalize": "none"}
    with pytest.raises(BackboneError) as info:
        _build_backbone(cfg)
    assert "could not be read as plain tensors" in str(info.value) and "nothing in it was executed" in str(info.value)
    assert "\n" not in str(info.value) and not marker.exists()


# --- damaged images ----------------------------------------------------------------------------
def _image_tree(root: Path) -> tuple[Path, list[Path]]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        for cls in ("cat", "dog", "fox"):
            for i in range(n):
                path = root / split / cls / f"{i}.{'png' if i == 0 else 'jpg'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(path, format="PNG" if i == 0 else "JPEG")
    damaged = [root / "train" / "dog" / "2.jpg", root / "train" / "fox" / "0.png", root / "test" / "cat" / "1.jpg"]
    for path in damaged[:2]:  # truncated: the header reads fine, the pixels are missing
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    damaged[2].write_bytes(b"not an image at all")
    return root, damaged


@pytest.mark.unit
def test_truncated_images_are_found_at_scan_time(tmp_path):
    from PIL import Image

    from scenarios.datasets.imagefolder import read_imagefolder_split

    root, damaged = _image_tree(tmp_path / "pets")
    with Image.open(damaged[0]) as im:
        im.size  # a header check alone would accept it
    with pytest.raises(DatasetError) as info:
        read_imagefolder_split(root, image_size=16, name="pets")
    assert "3 of 27 image files" in str(info.value) and "scenario.bad_images=skip" in str(info.value)
    train, test = read_imagefolder_split(root, image_size=16, name="pets", bad_images="skip")
    assert (len(train), len(test)) == (16, 8)
    assert sorted(p for p, _ in train.skipped_files + test.skipped_files) == sorted(map(str, damaged))


def test_bad_images_fail_or_skip_and_report_through_a_run(compose, run_quiet, tmp_path):
    root, damaged = _image_tree(tmp_path / "pets")
    overrides = ["strategy=finetune", "scenario=imagefolder", f"scenario.root={root}", "scenario.n_classes=3",
                 "scenario.image_size=16", "scenario.init_cls=1", "scenario.increment=1", "backbone=vit-tiny",
                 "debug=fast"]
    with pytest.raises(DatasetError) as info:
        run_quiet(compose(*overrides))
    assert str(damaged[0]) in str(info.value) or "first:" in str(info.value)
    path, lines = run_quiet(compose(*overrides, "scenario.bad_images=skip"))
    result = json.loads(path.read_text())
    assert result["status"] == "finished"
    (warning,) = result["data_warnings"]
    assert warning["type"] == "skipped_images" and warning["count"] == 3
    assert sorted(f["path"] for f in warning["files"]) == sorted(map(str, damaged))
    assert any("left out" in line for line in lines)  # said on the console too, never silently


@pytest.mark.unit
def test_an_image_damaged_after_the_scan_is_a_clear_error(tmp_path):
    from scenarios.datasets.imagefolder import read_imagefolder_split

    root, damaged = _image_tree(tmp_path / "pets")
    train, _ = read_imagefolder_split(root, image_size=16, name="pets", bad_images="skip")
    victim = Path(train.samples[0][0])
    victim.write_bytes(victim.read_bytes()[:40])
    with pytest.raises(DatasetError, match="cannot decode this image"):
        train[0]


# --- determinism -------------------------------------------------------------------------------
def test_the_same_config_and_seed_give_the_same_numbers(compose, run_quiet, tmp_path, unbroken):
    cfg = compose(*OVERRIDES, f"results_root={tmp_path / 'again'}")
    path, _ = run_quiet(cfg)
    again = json.loads(path.read_text())
    reference, reference_state = unbroken
    assert again["acc_matrix"] == reference["acc_matrix"] and again["task_il_matrix"] == reference["task_il_matrix"]
    assert_same_state(final_state(cfg)["strategy"], reference_state)
    losses = [e["loss"] for e in run_dir(cfg).events() if e["event"] == "epoch_end"]
    assert len(losses) == 10
