"""Stopping after experience 2 and running the same command again ends with the unbroken run's matrix."""
import json

import pytest
import torch

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("strategy", ["finetune", "joint"])
def test_resume_gives_the_same_matrix_as_an_unbroken_run(compose, run_quiet, tmp_path, strategy):
    overrides = [f"strategy={strategy}", "scenario=synthetic", "debug=fast", "trainer.limit_train_batches=3"]
    unbroken = compose(*overrides, f"results_root={tmp_path / 'a'}")
    path_a, _ = run_quiet(unbroken)

    stopped = compose(*overrides, f"results_root={tmp_path / 'b'}", "trainer.stop_after=2")
    path_b, lines = run_quiet(stopped)
    partial = json.loads(path_b.read_text())
    assert partial["status"] == "partial" and len(partial["acc_matrix"]) == 2
    assert any("resume" in line for line in lines)

    resumed = compose(*overrides, f"results_root={tmp_path / 'b'}")
    path_c, lines = run_quiet(resumed)
    assert path_c == path_b  # stop_after does not change the run's identity
    assert any("resuming run" in line for line in lines)
    a, c = json.loads(path_a.read_text()), json.loads(path_c.read_text())
    assert c["status"] == "finished"
    assert c["acc_matrix"] == a["acc_matrix"]  # exactly, on CPU
    events = [json.loads(x) for x in (path_c.parent / "events.jsonl").read_text().splitlines()]
    assert [e["experience"] for e in events if e["event"] == "experience_end"] == [0, 1, 2, 3, 4]


def test_a_corrupt_last_checkpoint_falls_back_to_the_previous(compose, run_quiet, tmp_path):
    overrides = ["strategy=finetune", "scenario=synthetic", "debug=fast", "trainer.limit_train_batches=2",
                 f"results_root={tmp_path}"]
    path, _ = run_quiet(compose(*overrides, "trainer.stop_after=3"))
    ckpt = path.parent / "checkpoints" / "exp_002.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    path, lines = run_quiet(compose(*overrides))
    assert any("corrupt" in line for line in lines)
    assert any("after experience 1" in line for line in lines)
    result = json.loads(path.read_text())
    assert result["status"] == "finished" and len(result["acc_matrix"]) == 5


def test_checkpoints_hold_plain_tensors_only(compose, run_quiet, tmp_path):
    path, _ = run_quiet(compose("strategy=simplecil", "scenario=synthetic", "debug=fast",
                                f"results_root={tmp_path}"))
    state = torch.load(path.parent / "checkpoints" / "exp_004.pt", weights_only=True)
    assert state["next_experience"] == 5 and "prototypes" in state["strategy"]
