"""Reliability through the real command: SIGKILL at random moments and SIGTERM lose nothing and the final matrix is
the unbroken run's, one process per run directory, different runs under one results root do not clash, and bad
input is one `error:` line with exit code 2.

Each subprocess pays Python's and torch's start-up (seconds on 2 CPUs), so the runs are the tiny synthetic stream.
`CLBENCH_KILLS` raises the number of SIGKILLs (default 6).
"""
import csv
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
# 10 experiences (one class each) x 3 epochs x 3 batches: a few seconds of training after the start-up.
N_EXP = 10
BASE = ["strategy=finetune", "scenario=synthetic", "debug=fast", "scenario.limit_per_class=48", "scenario.init_cls=1",
        "scenario.increment=1", "trainer.epochs=3", "trainer.progress=false", "trainer.device=cpu"]
KILLS = int(os.environ.get("CLBENCH_KILLS", "6"))
SEED = int(os.environ.get("CLBENCH_KILL_SEED", "3"))


def command(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), *args]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), capture_output=True, text=True, cwd=ROOT, env=env(), timeout=timeout)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env())


def result_path(proc: subprocess.CompletedProcess) -> Path:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip().splitlines()[-1].removeprefix("result: "))


def event_lines(run_dir: Path) -> list[str]:
    p = run_dir / "events.jsonl"
    return p.read_text().splitlines() if p.is_file() else []


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> bool:
    """Polls until `predicate()` holds (True) or the process exits (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    raise TimeoutError("the run neither progressed nor exited")


def assert_consistent(run_dir: Path) -> dict:
    """What a kill may leave: whole files only. Returns a few facts for the report."""
    facts = {"checkpoints": 0, "torn_checkpoint": False}
    result = run_dir / "result.json"
    if result.exists():
        data = json.loads(result.read_text())  # never half a file
        assert data["status"] in ("partial", "interrupted", "finished") and len(data["acc_matrix"]) <= N_EXP
        rows = list(csv.reader((run_dir / "acc_matrix.csv").read_text().splitlines()))
        assert rows[0][0] == "trained_on"
    verified = []
    for pt in sorted((run_dir / "checkpoints").glob("*.pt")):
        digest = pt.with_suffix(".sha256")
        if digest.is_file() and digest.read_text().strip() == hashlib.sha256(pt.read_bytes()).hexdigest():
            state = torch.load(pt, weights_only=True)  # a verified checkpoint always loads
            assert isinstance(state, dict)
            if pt.name.startswith("exp_"):
                verified.append(int(pt.stem[4:]))
        else:
            # Killed between writing the file and its digest: loading rejects it and falls back.
            facts["torn_checkpoint"] = True
    facts["checkpoints"] = len(verified)
    facts["newest"] = max(verified, default=-1)
    lines = event_lines(run_dir)
    events = [json.loads(line) for line in lines[:-1]]  # every line but a torn last one parses
    if lines:
        try:
            events.append(json.loads(lines[-1]))
        except json.JSONDecodeError:
            pass
    ended = [e["experience"] for e in events if e["event"] == "experience_end"]
    if ended:  # `experience_end` is logged only after that experience's checkpoint is on disk
        assert verified and max(verified) >= max(ended)
    return facts


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The unbroken run through the same command: its matrix, final weights and training time."""
    root = tmp_path_factory.mktemp("reference")
    proc = run_cli(*BASE, f"results_root={root}")
    path = result_path(proc)
    events = [json.loads(line) for line in event_lines(path.parent)]
    train_s = events[-1]["time"] - events[0]["time"]  # run_start -> run_end
    state = torch.load(sorted((path.parent / "checkpoints").glob("exp_*.pt"))[-1], weights_only=True)
    return json.loads(path.read_text()), state["strategy"], train_s, path.parent.name


def test_sigkill_at_random_moments_and_sigterm_lose_nothing(tmp_path, reference):
    expected, expected_state, train_s, run_id = reference
    root = tmp_path / "runs"
    run_dir = root / run_id
    rng = random.Random(SEED)
    kills, torn, sigterm_done = 0, 0, False
    modes = {"start-up": 0, "experience end": 0, "training": 0}
    done_after_kill = []  # experiences safely checkpointed after each kill
    while kills < KILLS:
        before = len(event_lines(run_dir))
        proc = start(*BASE, f"results_root={root}")
        if kills == 2 and not sigterm_done:
            # One SIGTERM mid-training through the real command: checkpoint, exit 75, resume from partial.pt.
            in_training = lambda: any('"epoch_end"' in line for line in event_lines(run_dir)[before:])  # noqa: E731
            assert wait_for(in_training, proc), proc.communicate()[1][-3000:]
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 75, err[-3000:]
            assert "interrupted: interrupted by SIGTERM" in err and "Traceback" not in err
            assert "run the same command to resume" in err
            assert (run_dir / "checkpoints" / "partial.pt").is_file() or "before experience" in err
            assert json.loads((run_dir / "result.json").read_text())["status"] == "interrupted"
            assert_consistent(run_dir)
            sigterm_done = True
            continue
        mode = rng.random()
        if mode < 0.2:  # during the start-up (imports, data, model build)
            time.sleep(rng.uniform(0.5, 4.0))
            modes["start-up"] += 1
        elif mode < 0.5:  # around an experience's end: evaluation, checkpoint and result writes
            last_epoch = lambda: any('"epoch": 2,' in line and '"epoch_end"' in line  # noqa: E731
                                     for line in event_lines(run_dir)[before:])
            if not wait_for(last_epoch, proc):
                break  # it finished on its own
            time.sleep(rng.uniform(0.0, 0.4))
            modes["experience end"] += 1
        else:  # any time once this process works
            started = lambda: len(event_lines(run_dir)) > before  # noqa: E731
            if not wait_for(started, proc):
                break  # it finished on its own
            time.sleep(rng.uniform(0.0, train_s / 4))
            modes["training"] += 1
        if proc.poll() is not None:
            break
        proc.kill()  # SIGKILL: no handler runs
        proc.communicate()
        kills += 1
        facts = assert_consistent(run_dir)
        torn += facts["torn_checkpoint"]
        done_after_kill.append(facts["newest"] + 1)
    final = run_cli(*BASE, f"results_root={root}")
    path = result_path(final)
    result = json.loads(path.read_text())
    assert result["status"] == "finished"
    assert result["acc_matrix"] == expected["acc_matrix"]  # exactly, on CPU
    assert result["task_il_matrix"] == expected["task_il_matrix"]
    state = torch.load(sorted((path.parent / "checkpoints").glob("exp_*.pt"))[-1], weights_only=True)["strategy"]
    assert all(torch.equal(state[k], expected_state[k]) for k in expected_state)
    assert not (path.parent / "checkpoints" / "partial.pt").exists()
    events = [json.loads(line) for line in event_lines(path.parent) if line.startswith("{") and line.endswith("}")]
    ended = [e["experience"] for e in events if e["event"] == "experience_end"]
    assert sorted(set(ended)) == list(range(N_EXP))
    print(f"\nsurvived {kills} SIGKILLs ({modes}; experiences checkpointed after each: {done_after_kill}) and "
          f"1 SIGTERM; "
          f"{torn} kill(s) left a checkpoint without its digest (rejected on load); final matrix equals the "
          f"unbroken run's")
    assert kills == KILLS and sigterm_done


def test_one_process_per_run_directory_and_different_runs_do_not_clash(tmp_path):
    root = tmp_path / "runs"
    long = [*BASE, "trainer.epochs=40", f"results_root={root}"]  # minutes: it is killed below
    other = ["strategy=simplecil", "scenario=synthetic", "debug=fast", "trainer.progress=false", "seed=5",
             f"results_root={root}"]
    first = start(*long)
    neighbour = start(*other)  # another run under the same results root, at the same time
    try:
        def holds_lock() -> bool:
            for lock in root.glob("*/run.lock"):
                try:
                    if json.loads(lock.read_text() or "{}").get("pid") == first.pid:
                        return True
                except ValueError:
                    pass
            return False

        assert wait_for(holds_lock, first), first.communicate()[1][-3000:]
        t = time.time()
        second = run_cli(*long)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: run directory ")
        assert f"in use by pid {first.pid} on host {socket.gethostname()}" in lines[0]
        assert "wait for it to finish" in lines[0]
        assert first.poll() is None  # the first run goes on undisturbed
        out, err = neighbour.communicate(timeout=600)
        assert neighbour.returncode == 0, err[-3000:]
        assert json.loads(Path(out.strip().splitlines()[-1].removeprefix("result: ")).read_text())["status"] == "finished"
        print(f"\nsecond process refused after {time.time() - t:.1f}s (its start-up included)")
    finally:
        first.kill()
        first.communicate()
    # SIGKILL left no lock behind: the kernel released it with the process.
    import fcntl

    (lock,) = [p for p in root.glob("*/run.lock") if json.loads(p.read_text()).get("pid") == first.pid]
    with open(lock, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _resnet_weights(path: Path) -> Path:
    from cl.app.cli import compose_config
    from cl.models import backbones

    backbone = backbones.build(compose_config(["backbone=resnet-tiny"])["backbone"])
    torch.save(backbone.model.state_dict(), path)
    return path


@pytest.mark.parametrize("args, needle", [
    pytest.param(["trainer.epoch=3"], "unknown config key 'trainer.epoch' (did you mean 'trainer.epochs'?)",
                 id="misspelled-key"),
    pytest.param(["strategy.lrr=1"], "did you mean 'strategy.train.lr'?", id="misspelled-nested-key"),
    pytest.param(["trainer.epochs=["], "cannot parse 'trainer.epochs=['", id="unparsable"),
    pytest.param(["scenario.bad_images=skp"], "unknown scenario.bad_images 'skp' (did you mean 'skip'?)",
                 id="unknown-choice"),
    pytest.param(["backbone=vit-tiny", "backbone.weights={weights}"], "does not match architecture",
                 id="weights-for-another-backbone"),
    pytest.param(["results_root={blocked}/runs"], "not a writable folder", id="results-root-not-writable"),
])
def test_bad_input_is_one_line_exit_2_and_no_work(tmp_path, args, needle):
    blocked = tmp_path / "a-file"
    blocked.write_text("a file where a folder should be")
    weights = _resnet_weights(tmp_path / "resnet.pth") if any("{weights}" in a for a in args) else None
    args = [a.format(weights=weights, blocked=blocked) for a in args]
    root = [] if any(a.startswith("results_root=") for a in args) else [f"results_root={tmp_path / 'runs'}"]
    proc = run_cli("strategy=finetune", "scenario=synthetic", "debug=fast", "trainer.progress=false", *root, *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert not list(tmp_path.rglob("result.json"))
