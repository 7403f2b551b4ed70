"""Slurm requests that fit the cluster they go to, and why a submitted job waits.

The launcher's defaults (4 CPUs, 16 GB per job) are what a benchmark run wants on a real cluster; a job asking for
more than any node of its partition has stays PENDING for ever (reason `PartitionConfig` or `Resources`). So each
default is capped by what the partition's largest node offers (`sinfo`), unless the user set it
(`CLBENCH_SLURM_CPUS`, `CLBENCH_SLURM_MEM_GB`), in which case it is taken as given and `--status` explains the wait.
Used by `configs/hydra/launcher/slurm.yaml` (through the `clbench_slurm` resolver, registered by `cl.app.cli`) and by
`scripts/submit.py`. Without `sinfo` (a laptop composing a config) the defaults stay as they are.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from functools import lru_cache
from typing import Mapping

DEFAULTS = {"CPUS": 4, "MEM_GB": 16, "GPUS": 0, "TIME_MIN": 240, "ARRAY_PARALLELISM": 64}


def _run(*cmd: str) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout if p.returncode == 0 else None


@lru_cache(maxsize=8)
def partition_limits(partition: str | None = None) -> dict | None:
    """{'partition', 'cpus', 'mem_gb'} of the partition's largest node (the default partition when None), or None
    when Slurm cannot be asked."""
    args = ["sinfo", "-h", "-N", "-o", "%P|%c|%m"] + (["-p", partition] if partition else [])
    out = _run(*args)
    if not out:
        return None
    rows = []
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        name, cpus, mem = parts[0], int(parts[1]), parts[2].rstrip("+")
        if partition is None and not name.endswith("*"):
            continue  # sinfo marks the default partition with '*'
        rows.append((name.rstrip("*"), cpus, int(mem) if mem.isdigit() else 0))
    if not rows:
        return None
    cpus = max(r[1] for r in rows)
    mem_gb = max(r[2] for r in rows) // 1024
    return {"partition": rows[0][0], "cpus": cpus, "mem_gb": mem_gb}


def fitted(name: str, env: Mapping[str, str] = os.environ) -> int:
    """`CLBENCH_SLURM_<name>` when set; else the default, capped by the partition's largest node for CPUS and
    MEM_GB."""
    value = env.get(f"CLBENCH_SLURM_{name}")
    if value not in (None, ""):
        return int(value)
    default = DEFAULTS[name]
    if name not in ("CPUS", "MEM_GB"):
        return default
    limits = partition_limits(env.get("CLBENCH_SLURM_PARTITION") or None)
    if limits is None:
        return default
    offered = limits["cpus"] if name == "CPUS" else limits["mem_gb"]
    return max(1, min(default, offered)) if offered > 0 else default


def _job_fields(job_id: str) -> dict:
    out = _run("scontrol", "show", "job", "-o", str(job_id)) or ""
    fields = {}
    for token in out.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


def _gb(text: str) -> float | None:
    units = {"K": 1 / 1024 ** 2, "M": 1 / 1024, "G": 1, "T": 1024}
    if not text:
        return None
    if text[-1].upper() in units and text[:-1].replace(".", "", 1).isdigit():
        return float(text[:-1]) * units[text[-1].upper()]
    return float(text) / 1024 if text.isdigit() else None


def why_pending(job_id: str) -> str | None:
    """One line saying why a PENDING job waits and what fixes it; None when it is not pending (or Slurm is silent)."""
    f = _job_fields(job_id)
    if f.get("JobState") != "PENDING":
        return None
    reason = f.get("Reason", "unknown")
    if reason in ("None", "Priority", "BeginTime"):
        return f"waits for its turn ({reason}): nothing to fix"
    cpus = int(f["NumCPUs"]) if f.get("NumCPUs", "").isdigit() else None
    mem = _gb(f.get("MinMemoryNode") or f.get("MinMemoryCPU") or "")
    limits = partition_limits(f.get("Partition") or None)
    if limits and ((cpus and cpus > limits["cpus"]) or (mem and mem > limits["mem_gb"])):
        return (f"waits ({reason}): asks {cpus} CPUs and {mem:.0f} GB per job, but the largest node of partition "
                f"'{limits['partition']}' has {limits['cpus']} CPUs and {limits['mem_gb']} GB: resubmit with "
                f"CLBENCH_SLURM_CPUS={min(cpus or 1, limits['cpus'])} "
                f"CLBENCH_SLURM_MEM_GB={max(1, min(int(mem or 1), limits['mem_gb']))} (or unset them: the defaults "
                f"fit the partition)")
    hints = {"Resources": "the nodes are busy; it starts when they free up",
             "ReqNodeNotAvail": "the requested nodes are down or drained: check `sinfo -R`",
             "PartitionDown": "the partition is down: `scontrol update PartitionName=... State=UP`",
             "QOSMaxJobsPerUserLimit": "your QOS limit on running jobs: wait, or lower CLBENCH_SLURM_ARRAY_PARALLELISM",
             "AssocGrpCpuLimit": "your account's CPU limit: wait, or ask for fewer CPUs (CLBENCH_SLURM_CPUS)"}
    return f"waits ({reason}): {hints.get(reason, 'see `scontrol show job ' + str(job_id) + '`')}"
