#!/usr/bin/env python
"""Detached Slurm sweep: submit the array and return at once (Hydra's launcher waits on the login node).

    python scripts/submit.py strategy=finetune,simplecil seed=0,1 scenario=digits   # submits 4 jobs, prints ids
    python scripts/submit.py --status multirun/submit-20260101-120000               # which ran, failed and why
    python scripts/submit.py --dry-run strategy=a,b seed=0,1                         # only lists the jobs

The overrides are those of `python run.py -m ...` (comma lists and Hydra sweep functions such as range() are
expanded into their product). Each job composes its config exactly as run.py does and runs it in its own process
under submitit, writing the deterministic run directory; so a job pre-empted or out of time (Slurm's USR2 before the
limit) checkpoints, is requeued by submitit (`checkpoint` below) and resumes. Slurm settings come from the same
CLBENCH_SLURM_* variables as configs/hydra/launcher/slurm.yaml. Nothing needs this process afterwards: the
leaderboard reads result files (`python scripts/leaderboard.py results/runs`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def expand(overrides: list[str]) -> list[list[str]]:
    """The sweep's jobs: the product of every sweep override's values, in command-line order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for o in parsed:
        key = o.get_key_element()
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        choices.append([f"{key}={v}" for v in values])
    return [list(job) for job in itertools.product(*choices)]


def slurm_parameters(env=os.environ) -> dict:
    """submitit's Slurm parameters from CLBENCH_SLURM_* (defaults as in configs/hydra/launcher/slurm.yaml: CPUs and
    memory capped by the partition's largest node, cl/app/slurm.py)."""
    from cl.app.slurm import fitted

    params = {"slurm_gpus_per_node": fitted("GPUS", env), "slurm_cpus_per_task": fitted("CPUS", env),
              "slurm_mem_gb": fitted("MEM_GB", env), "timeout_min": fitted("TIME_MIN", env),
              "slurm_array_parallelism": fitted("ARRAY_PARALLELISM", env), "slurm_signal_delay_s": 120,
              "name": "clbench"}
    for name in ("PARTITION", "ACCOUNT", "QOS"):
        if env.get(f"CLBENCH_SLURM_{name}"):
            params[f"slurm_{name.lower()}"] = env[f"CLBENCH_SLURM_{name}"]
    if not params["slurm_gpus_per_node"]:
        del params["slurm_gpus_per_node"]  # a cluster without GRES rejects any gpus request, even 0
    return params


class RunJob:
    """One run, executed inside the Slurm job (pickled by submitit)."""

    def __init__(self, overrides: list[str]):
        self.overrides = list(overrides)

    def __call__(self) -> str:
        sys.path.insert(0, str(ROOT))
        from cl.app.cli import compose_config
        from cl.app.experiment import run_experiment

        return str(run_experiment(compose_config(self.overrides)))

    def checkpoint(self):
        """submitit calls this on USR2 (after the engine's own checkpoint): requeue the same run, which resumes."""
        import submitit

        return submitit.helpers.DelayedSubmission(RunJob(self.overrides))


def submit(jobs: list[list[str]], folder: Path) -> list[str]:
    import submitit

    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm", slurm_max_num_timeout=3)
    executor.update_parameters(**slurm_parameters())
    with executor.batch():
        handles = [executor.submit(RunJob(job)) for job in jobs]
    ids = [h.job_id for h in handles]
    manifest = {"submitted": time.time(), "jobs": [{"job_id": i, "overrides": o} for i, o in zip(ids, jobs)]}
    (folder / "sweep.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return ids


def status(folder: Path) -> list[dict]:
    """Each job's state and, for a failed one, the last line of its error (from submitit's result or log)."""
    import submitit

    manifest = json.loads((folder / "sweep.json").read_text())
    rows = []
    for entry in manifest["jobs"]:
        job = submitit.SlurmJob(folder=str(folder / "%j"), job_id=entry["job_id"])
        row = {"job_id": entry["job_id"], "overrides": " ".join(entry["overrides"]), "state": job.state}
        if row["state"] == "PENDING":
            from cl.app.slurm import why_pending

            row["why"] = why_pending(entry["job_id"])
        if job.done():
            try:
                row["result"] = job.result()
                row["state"] = "finished"
            except Exception as exc:  # noqa: BLE001 - the job's own error, reported, not raised
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                errors = [line for line in lines if "Error: " in line or "Exception: " in line]  # the raise line
                row["state"] = "failed"
                row["error"] = (errors or lines or [type(exc).__name__])[-1]
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--folder", help="where submitit keeps scripts, logs and pickles (default multirun/submit-<time>)")
    ap.add_argument("--dry-run", action="store_true", help="list the jobs, submit nothing")
    ap.add_argument("--status", metavar="FOLDER", help="summarise a submitted sweep: finished, failed (why), running")
    a = ap.parse_args(argv)
    if a.status:
        rows = status(Path(a.status))
        for r in rows:
            extra = r.get("error") or r.get("why") or r.get("result") or ""
            print(f"{r['job_id']:>12}  {r['state']:<10} {r['overrides']}  {extra}")
        failed = sum(r["state"] == "failed" for r in rows)
        pending = sum(r["state"] == "PENDING" for r in rows)
        print(f"{len(rows)} jobs: {sum(r['state'] == 'finished' for r in rows)} finished, {failed} failed"
              + (f", {pending} pending" if pending else ""))
        return 1 if failed else 0
    if not a.overrides:
        ap.error("give the run.py overrides of the sweep, e.g. strategy=finetune,simplecil seed=0,1")
    from cl.app.cli import check_group_overrides

    overrides = list(a.overrides)
    problem = check_group_overrides(overrides)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    jobs = expand(overrides)
    if a.dry_run:
        for job in jobs:
            print(" ".join(job))
        return 0
    folder = Path(a.folder or ROOT / "multirun" / time.strftime("submit-%Y%m%d-%H%M%S")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    ids = submit(jobs, folder)
    print(f"submitted {len(ids)} jobs ({ids[0]} .. {ids[-1]}); follow with: python scripts/submit.py --status {folder}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
