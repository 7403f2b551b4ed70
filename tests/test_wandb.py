"""logger=wandb: offline unless configured, writes its files into the run directory, sends nothing."""
from __future__ import annotations

import pytest

from cl.engine.errors import ConfigError
from cl.app.loggers import wandb_mode
from cl.engine.results import config_hash

pytestmark = pytest.mark.unit


@pytest.fixture
def no_wandb_env(monkeypatch):
    for var in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_API_KEY", "WANDB_ENTITY", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    # Nothing listens on port 9 (discard): an attempt to reach a server would fail and be logged.
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_mode_is_offline_unless_configured(no_wandb_env, monkeypatch):
    assert wandb_mode({}) == "offline"
    assert wandb_mode({"project": "p"}) == "online"
    monkeypatch.setenv("WANDB_PROJECT", "p")
    assert wandb_mode({}) == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode({"project": "p"}) == "offline"  # the environment's explicit mode wins over a project
    assert wandb_mode({"mode": "disabled"}) == "disabled"
    with pytest.raises(ConfigError, match="online, offline or disabled"):
        wandb_mode({"mode": "onlin"})


@pytest.mark.e2e
def test_offline_run_writes_its_files_and_sends_nothing(no_wandb_env, compose, run_quiet):
    cfg = compose("strategy=simplecil", "scenario=digits", "debug=fast", "scenario.limit_per_class=4",
                  "scenario.init_cls=5", "scenario.increment=5", "logger=wandb")
    assert cfg["logger"]["name"] == "wandb"
    without = {k: v for k, v in cfg.items() if k != "logger"}
    assert config_hash(cfg) == config_hash(without)  # logging does not change the run's identity

    path, _ = run_quiet(cfg)
    folder = path.parent / "wandb"
    offline = list(folder.glob("offline-run-*"))
    assert len(offline) == 1, list(folder.iterdir())
    assert not list(folder.glob("run-*")), "an online run folder was created"
    run_id = path.parent.name
    log = offline[0] / f"run-{run_id}.wandb"  # wandb's record of everything logged, for `wandb sync`
    data = log.read_bytes()
    for key in (b"acc_seen", b"acc/exp_1", b"metrics/last_acc", b"costs/wall_s", b"acc_matrix"):
        assert key in data, key
    internal = (offline[0] / "logs" / "debug-internal.log").read_text(errors="replace")
    assert "127.0.0.1:9" not in internal  # the server address was never contacted
