import json

import pytest
import torch

from cl.engine.results import RunDir, config_hash, finished_indices, matrix_csv

pytestmark = pytest.mark.unit


def test_config_hash_ignores_where_and_how_verbosely():
    cfg = {"seed": 1, "strategy": {"name": "finetune"}, "trainer": {"epochs": 3, "progress": True},
           "results_root": "a"}
    same = {**cfg, "results_root": "b", "trainer": {"epochs": 3, "progress": False, "stop_after": 2}}
    other = {**cfg, "trainer": {"epochs": 4, "progress": True}}
    assert config_hash(cfg) == config_hash(same)
    assert config_hash(cfg) != config_hash(other)
    assert config_hash(cfg) != config_hash({**cfg, "seed": 2})


def test_mos_batched_eval_keeps_the_run_hash():
    """A speed-only switch: finished MOS runs from before the option existed keep their directory."""
    cfg = {"seed": 1, "strategy": {"name": "mos", "reg": 0.1}}
    assert config_hash(cfg) == config_hash({**cfg, "strategy": {"name": "mos", "reg": 0.1, "batched_eval": True}})
    assert config_hash(cfg) == config_hash({**cfg, "strategy": {"name": "mos", "reg": 0.1, "batched_eval": False}})


def test_result_and_matrix_are_written_whole(tmp_path):
    run = RunDir(tmp_path, "abc")
    run.create()
    run.write_result({"acc_matrix": [[90.0, None], [80.0, 70.0]], "status": "finished"})
    assert json.loads(run.result_path.read_text())["status"] == "finished"
    lines = (run.path / "acc_matrix.csv").read_text().splitlines()
    assert lines == ["trained_on,exp_0,exp_1", "exp_0,90.0000,", "exp_1,80.0000,70.0000"]
    assert not list(run.path.glob(".*.tmp"))


def test_checkpoints_keep_the_newest_and_fall_back_on_corruption(tmp_path):
    run = RunDir(tmp_path, "abc")
    run.create()
    for i in range(3):
        run.save_checkpoint(i, {"next_experience": i + 1, "w": torch.full((2,), float(i))}, keep=2)
    assert sorted(p.name for p in run.ckpt_dir.glob("*.pt")) == ["exp_001.pt", "exp_002.pt"]
    assert run.load_latest_checkpoint()["next_experience"] == 3
    # A torn write of the newest checkpoint: the previous one is used, with a warning.
    newest = run.checkpoint_path(2)
    newest.write_bytes(newest.read_bytes()[:20])
    warnings = []
    state = run.load_latest_checkpoint(warn=warnings.append)
    assert state["next_experience"] == 2 and "corrupt" in warnings[0]


def test_events_skip_a_torn_last_line(tmp_path):
    run = RunDir(tmp_path, "abc")
    run.create()
    run.log_event("experience_end", experience=0)
    run.log_event("experience_end", experience=1)
    with open(run.path / "events.jsonl", "a") as f:
        f.write('{"event": "experience_e')
    assert finished_indices(run.events()) == [0, 1]


def test_matrix_csv_empty():
    assert matrix_csv([]) == "trained_on\n"
