"""The run contract later issues and users' scripts rely on, checked through the real command line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    proc = run_cli("strategy=simplecil", "scenario=synthetic", "debug=fast", f"results_root={root}",
                   "trainer.progress=false", "seed=3")
    return root, proc


def test_last_stdout_line_is_the_result_path(finished_run):
    root, proc = finished_run
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("result: ")
    path = Path(last.removeprefix("result: "))
    assert path.is_absolute() and path.is_file() and path.parent.parent == root


def test_run_directory_holds_the_contract_files(finished_run):
    root, proc = finished_run
    path = Path(proc.stdout.strip().splitlines()[-1].removeprefix("result: "))
    run_dir = path.parent
    assert len(run_dir.name) == 16  # the config hash
    result = json.loads(path.read_text())
    assert result["status"] == "finished"
    n = len(result["acc_matrix"])
    assert n == 5 and all(len(row) == n for row in result["acc_matrix"])
    for key in ("avg_incremental_acc", "last_acc", "forgetting", "bwt"):
        assert isinstance(result["metrics"][key], float)
    assert len(result["costs"]["per_experience"]) == n
    for cost in result["costs"]["per_experience"]:
        for key in ("wall_s", "train_images_per_s", "eval_images_per_s", "forward_passes_per_test_image",
                    "peak_memory_mb", "trainable_params", "added_params"):
            assert key in cost
    assert result["config"]["strategy"]["name"] == "simplecil" and result["seed"] == 3
    assert result["environment"]["versions"]["torch"]
    assert "commit" in result["environment"]["git"] and result["environment"]["device"]["type"] == "cpu"
    assert result["weights_id"].startswith("random-init") and result["pretrained"] is False
    assert any("randomly initialised" in w for w in result["warnings"])
    assert result["stream"]["class_order"] and result["test_counts"]
    assert (run_dir / "acc_matrix.csv").read_text().startswith("trained_on,exp_0")
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["experience"] for e in events if e["event"] == "experience_end"] == list(range(n))
    assert all("event" in e for e in events)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == ["exp_003.pt", "exp_004.pt"]


def test_rerunning_a_finished_run_reloads_it(finished_run):
    root, first = finished_run
    proc = run_cli("strategy=simplecil", "scenario=synthetic", "debug=fast", f"results_root={root}",
                   "trainer.progress=false", "seed=3")
    assert proc.returncode == 0
    assert proc.stdout.strip().splitlines()[-1] == first.stdout.strip().splitlines()[-1]
    assert "already finished" in proc.stdout
    run_dir = Path(first.stdout.strip().splitlines()[-1].removeprefix("result: ")).parent
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "experience_end" for e in events) == 5  # nothing re-ran


def test_the_console_shows_the_matrix_table(finished_run):
    _, proc = finished_run
    assert "accuracy matrix" in proc.stdout and "avg incremental acc" in proc.stdout


def test_multirun_runs_each_job(tmp_path):
    proc = run_cli("-m", "strategy=simplecil", "seed=1,2", "scenario=synthetic", "debug=fast",
                   f"results_root={tmp_path}", "trainer.progress=false", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 0, proc.stderr
    results = [line for line in proc.stdout.splitlines() if line.startswith("result: ")]
    assert len(results) == 2 and len(set(results)) == 2


@pytest.mark.parametrize("args, needle", [
    (["strategy=simplcil"], "did you mean 'simplecil'"),
    (["scenario=digts"], "did you mean 'digits'"),
    (["backbone=vit-tiney"], "did you mean 'vit-tiny'"),
    (["scenario.kind=tta"], "does not support tta"),
    (["scenario=imagefolder", "scenario.root=/nonexistent/imagenet-r"], "train/"),
    (["trainer.optimizer=lbfgs"], "unknown trainer.optimizer"),
])
def test_bad_input_is_one_clear_error_without_traceback(tmp_path, args, needle):
    proc = run_cli(*args, f"results_root={tmp_path}", "trainer.progress=false")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and needle in proc.stderr
    assert not list(tmp_path.glob("*/result.json"))  # failed before any work
