"""A Hydra multirun through a real single-node Slurm cluster, with one job pre-empted and requeued mid-run.

The module fixture brings the cluster up with `scripts/slurm/up.sh` (apt-get installs Slurm, munge and MariaDB when
missing: that needs root) and stops, at the end, exactly the daemons that call started. Without root, or without
Slurm and apt-get, the test is skipped with the reason; in CI (root, apt reachable) it runs.

What it proves:
- `hydra/launcher=slurm` submits the sweep as one Slurm array and each job writes its deterministic run directory;
- pre-emption: `scancel --signal=USR2` (what Slurm sends `signal_delay_s` before a time limit) makes the engine
  checkpoint at the next step, then submitit's handler (chained after the checkpoint) requeues the job, and the
  requeued job resumes inside the interrupted experience from `checkpoints/partial.pt` and finishes;
- the leaderboard builds from the sweep's result files.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parent.parent
UP, DOWN = ROOT / "scripts" / "slurm" / "up.sh", ROOT / "scripts" / "slurm" / "down.sh"
SWEEP_TIMEOUT_S = 600


def _skip_reason() -> str | None:
    if sys.platform != "linux":
        return "the Slurm test runs on Linux only"
    if os.geteuid() != 0:
        return "bringing up Slurm needs root (scripts/slurm/up.sh installs packages and starts system daemons)"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it"
    for module in ("submitit", "hydra_plugins.hydra_submitit_launcher"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is missing: pip install -e .[slurm]"
    return None


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    # A state file of our own: up.sh lists in it only the daemons this call starts, and down.sh stops only those
    # (a cluster that was already up is used and left running).
    state = tmp_path_factory.mktemp("slurm") / "started"
    env = {**os.environ, "CLBENCH_SLURM_STATE": str(state)}
    t0 = time.time()
    up = subprocess.run(["bash", str(UP)], env=env, capture_output=True, text=True, timeout=900)
    if up.returncode != 0:
        subprocess.run(["bash", str(DOWN)], env=env, capture_output=True, timeout=120)
        pytest.fail(f"scripts/slurm/up.sh failed:\n{up.stdout}\n{up.stderr}")
    print(f"\nslurm up in {time.time() - t0:.1f}s:\n{up.stdout}")
    yield
    t0 = time.time()
    down = subprocess.run(["bash", str(DOWN)], env=env, capture_output=True, text=True, timeout=300)
    print(f"slurm down in {time.time() - t0:.1f}s:\n{down.stdout}{down.stderr}")
    assert down.returncode == 0, down.stderr


def _without_slurm_settings() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("CLBENCH_SLURM_") or k == "CLBENCH_SLURM_STATE"}


def _wait_for_run_line(submitit: Path, strategy: str, proc: subprocess.Popen, timeout: float) -> str:
    """The Slurm job id (`<array>_<task>`) whose log says the run of `strategy` started training."""
    end = time.time() + timeout
    pattern = re.compile(rf"^run [0-9a-f]+: strategy={strategy} ", re.M)
    while time.time() < end:
        for log in submitit.glob("*_*/*_log.out"):
            if pattern.search(log.read_text(errors="replace")):
                return log.parent.name
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"no job started a {strategy} run within {timeout}s")


def test_multirun_on_slurm_with_requeue_and_leaderboard(slurm_cluster, tmp_path):
    from cl.app.leaderboard import find_results, write_leaderboard

    runs, sweep = tmp_path / "runs", tmp_path / "sweep"  # fresh: job ids restart after a purge (stale pickles)
    # The launcher's own CPU and memory defaults (capped by what the partition offers, cl/app/slurm.py): a default that
    # asked for more than the one-node cluster has would leave the jobs PENDING for ever.
    env = {**_without_slurm_settings(),
           # >= 13 min so that submitit calls a USR2 "pre-emption", not a time-out (it counts those)
           "CLBENCH_SLURM_TIME_MIN": "20", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", "hydra/launcher=slurm", "strategy=simplecil,finetune",
           "scenario=digits", "debug=fast", "scenario.init_cls=5", "scenario.increment=5",  # 2 experiences
           "trainer.limit_train_batches=2", "trainer.device=cpu",
           "trainer.progress=false", f"results_root={runs}", f"hydra.sweep.dir={sweep}"]
    t0 = time.time()
    log = open(tmp_path / "multirun.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        job = _wait_for_run_line(sweep / ".submitit", "finetune", proc, timeout=300)
        # Pre-empt the finetune job while it trains: USR2 to its job step, as Slurm does before a limit.
        subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
        proc.wait(timeout=SWEEP_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", "--name=run"], timeout=30)
        log.close()
    output = (tmp_path / "multirun.log").read_text()
    print(f"multirun through Slurm (with one requeue) took {time.time() - t0:.1f}s")
    assert proc.returncode == 0, output[-3000:]

    results = {r["strategy"]: r for r in find_results([runs])}
    assert set(results) == {"simplecil", "finetune"}, output[-3000:]
    assert all(r["status"] == "finished" and len(r["acc_matrix"]) == 2 for r in results.values())
    events = [json.loads(line) for line in (Path(results["finetune"]["_path"]).parent / "events.jsonl")
              .read_text().splitlines()]
    kinds = [e["event"] for e in events]
    stop = next(e for e in events if e["event"] == "run_interrupted")
    assert stop["signal"] == "SIGUSR2" and stop["checkpoint"]
    resumed = [e for e in events if e["event"] == "run_resumed"]
    assert kinds.index("run_interrupted") < kinds.index("run_resumed") < kinds.index("run_end"), kinds
    assert resumed[0]["next_experience"] == stop["experience"]
    if stop["epoch"] is not None:  # stopped inside an experience: the requeued job went on from partial.pt
        assert (resumed[0]["epoch"], resumed[0]["batch"]) == (stop["epoch"], stop["batch"])
    assert kinds.count("run_start") == 1  # the requeued job did not start over
    # the requeue went through Slurm: the array task ran again under the same job id (MinJobAge keeps the record)
    show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30)
    assert re.search(r"\bRestarts=1\b", show.stdout), show.stdout + show.stderr

    files = write_leaderboard(find_results([runs]), tmp_path / "leaderboard")
    md = files["md"].read_text()
    assert "| simplecil | digits | resnet-tiny | 1 |" in md and "| finetune | digits | resnet-tiny | 1 |" in md


def test_submit_returns_at_once_and_status_names_the_failure(slurm_cluster, tmp_path):
    """scripts/submit.py: the array is submitted and the command returns while the jobs run; `--status` later says
    which job finished and which failed, with its one-line error (a bad value only the run's own check catches)."""
    folder = tmp_path / "submit"
    env = {**_without_slurm_settings(), "CLBENCH_SLURM_TIME_MIN": "20"}  # the README's submission, defaults
    script = str(ROOT / "scripts" / "submit.py")
    t0 = time.time()
    p = subprocess.run([sys.executable, script, "--folder", str(folder), "strategy=simplecil", "scenario=digits",
                        "debug=fast", "scenario.limit_per_class=8", "scenario.init_cls=5", "scenario.increment=5",
                        "trainer.device=cpu", "trainer.progress=false",
                        "scenario.bad_images=fail,skp", f"results_root={tmp_path / 'runs'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "submitted 2 jobs" in p.stdout, p.stdout + p.stderr
    ids = [j["job_id"] for j in json.loads((folder / "sweep.json").read_text())["jobs"]]
    assert subprocess.run(["squeue", "-h", "-j", ",".join(ids)], capture_output=True, text=True).stdout.strip() or \
        time.time() - t0 > 30, "submit.py waited for its jobs"
    end = time.time() + SWEEP_TIMEOUT_S
    while subprocess.run(["squeue", "-h", "-j", ",".join(ids)], capture_output=True, text=True).stdout.strip():
        assert time.time() < end, "the submitted jobs did not end"
        time.sleep(1)
    for _ in range(30):  # accounting records reach slurmdbd a moment after the job ends
        s = subprocess.run([sys.executable, script, "--status", str(folder)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        if "1 finished, 1 failed" in s.stdout:
            break
        time.sleep(1)
    assert s.returncode == 1 and "2 jobs: 1 finished, 1 failed" in s.stdout, s.stdout + s.stderr
    failed = next(line for line in s.stdout.splitlines() if " failed " in line)
    assert "bad_images=skp" in failed and "unknown scenario.bad_images 'skp'" in failed, failed
    assert (tmp_path / "runs").is_dir() and len(list((tmp_path / "runs").glob("*/result.json"))) == 1


def test_status_says_why_a_job_waits_and_the_fix(slurm_cluster, tmp_path):
    """A job that asks for more CPUs than the node has: `--status` names the reason and the variables that fix it."""
    folder = tmp_path / "submit"
    env = {**_without_slurm_settings(), "CLBENCH_SLURM_CPUS": "64", "CLBENCH_SLURM_TIME_MIN": "20"}
    script = str(ROOT / "scripts" / "submit.py")
    p = subprocess.run([sys.executable, script, "--folder", str(folder), "strategy=simplecil", "scenario=digits",
                        "debug=fast", f"results_root={tmp_path / 'runs'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        # Some Slurm configurations refuse an impossible request at submission: then that refusal is the answer.
        assert "CPU" in p.stderr or "cpu" in p.stderr, p.stdout + p.stderr
        return
    ids = [j["job_id"] for j in json.loads((folder / "sweep.json").read_text())["jobs"]]
    try:
        for _ in range(30):  # submitit reads the state from squeue/sacct: UNKNOWN until the scheduler has seen it
            time.sleep(1)
            s = subprocess.run([sys.executable, script, "--status", str(folder)], cwd=ROOT, capture_output=True,
                               text=True, timeout=120)
            line = next(line for line in s.stdout.splitlines() if ids[0] in line)
            if "waits (" in line:
                break
        assert "PENDING" in line and "waits (" in line, s.stdout + s.stderr
        assert "asks 64 CPUs" in line and "CLBENCH_SLURM_CPUS=" in line, line
        assert "1 pending" in s.stdout
    finally:
        subprocess.run(["scancel", *ids], timeout=30)
