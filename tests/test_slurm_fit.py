"""The Slurm request fits the partition (cl/app/slurm.py), checked against a stand-in `sinfo`/`scontrol` on PATH, so
it runs without a cluster; tests/test_slurm.py checks the same on the real one-node cluster."""
import os
import stat

import pytest

from cl.app import slurm

pytestmark = pytest.mark.cluster


def fake_tools(tmp_path, sinfo: str, scontrol: str = "") -> dict:
    for name, out in (("sinfo", sinfo), ("scontrol", scontrol)):
        tool = tmp_path / name
        tool.write_text(f"#!/bin/sh\ncat <<'OUT'\n{out}\nOUT\n")
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    slurm.partition_limits.cache_clear()
    return {"PATH": f"{tmp_path}:{os.environ['PATH']}"}


def test_defaults_are_capped_by_the_largest_node_and_user_values_win(tmp_path, monkeypatch):
    env = fake_tools(tmp_path, "debug*|2|21000\nbig|64|512000")
    monkeypatch.setenv("PATH", env["PATH"])
    assert slurm.fitted("CPUS", {}) == 2            # default 4, the default partition's node has 2
    assert slurm.fitted("MEM_GB", {}) == 16         # 21000 MB = 20 GB offered: the default 16 fits
    assert slurm.fitted("CPUS", {"CLBENCH_SLURM_PARTITION": "big"}) == 4
    assert slurm.fitted("CPUS", {"CLBENCH_SLURM_CPUS": "8"}) == 8  # the user's value is taken as given
    assert slurm.fitted("TIME_MIN", {}) == 240


def test_without_slurm_the_defaults_stay(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    slurm.partition_limits.cache_clear()
    assert slurm.fitted("CPUS", {}) == 4 and slurm.fitted("MEM_GB", {}) == 16


def test_why_pending_names_the_fix(tmp_path, monkeypatch):
    env = fake_tools(tmp_path, "debug*|2|21000",
                     "JobId=7 JobName=clbench JobState=PENDING Reason=PartitionConfig NumCPUs=4 "
                     "MinMemoryNode=16G Partition=debug")
    monkeypatch.setenv("PATH", env["PATH"])
    line = slurm.why_pending("7")
    assert line.startswith("waits (PartitionConfig): asks 4 CPUs and 16 GB per job")
    assert "CLBENCH_SLURM_CPUS=2" in line and "'debug' has 2 CPUs" in line


def test_launcher_config_uses_the_fitted_values(tmp_path, monkeypatch):
    from cl.app.cli import compose_config

    env = fake_tools(tmp_path, "debug*|2|21000")
    monkeypatch.setenv("PATH", env["PATH"])
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from cl.app.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["cpus_per_task"] == 2 and launcher["mem_gb"] == 16
    assert compose_config([])  # the resolver does not disturb ordinary composition
