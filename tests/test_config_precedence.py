"""Precedence of trainer values (issue 19, defect 1): command line > experiment preset > debug > the scenario's
own `trainer:` block > the strategy's `train:` block > configs/trainer/default.yaml.

Before the fix `trainer` composed after `scenario`, so `${oc.select:strategy.train.batch_size,32}` replaced the
CTTA scenarios' protocol batch sizes (200 / 200 / 64 / 50) with 32 in every run without a preset."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import strategies
from cl.app.cli import compose_config

pytestmark = pytest.mark.unit

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def scenario_trainer_values(name: str) -> dict:
    """The `trainer:` values a scenario file sets, its in-group parents' first (as Hydra merges them)."""
    cfg = OmegaConf.load(CONFIGS / "scenario" / f"{name}.yaml")
    out: dict = {}
    for entry in cfg.get("defaults", []) or []:
        if isinstance(entry, str) and entry != "_self_" and (CONFIGS / "scenario" / f"{entry}.yaml").exists():
            out.update(scenario_trainer_values(entry))
    if cfg.get("trainer"):
        out.update(OmegaConf.to_container(cfg.trainer))
    return out


SCENARIOS = {p.relative_to(CONFIGS / "scenario").with_suffix("").as_posix(): None
             for p in sorted((CONFIGS / "scenario").rglob("*.yaml"))}
OWNING = {s: v for s in SCENARIOS if (v := scenario_trainer_values(s))}


def _kind(scenario: str) -> str:
    return OmegaConf.load(CONFIGS / "scenario" / f"{scenario}.yaml").scenario.kind


def _supports(name: str) -> tuple:
    try:
        return strategies.get_class(name).supports
    except ImportError:  # an optional extra that is not installed: its pairs cannot run anyway
        return ()


# every runnable (scenario that sets a trainer value) x (registered strategy) pair, from the registry
PAIRS = [(s, n) for s in OWNING for n in strategies.names()
         if (CONFIGS / "strategy" / f"{n}.yaml").exists() and _kind(s) in _supports(n)]


def test_the_ctta_scenarios_own_their_batch_size():
    assert {k: v["batch_size"] for k, v in OWNING.items()} == {
        "cifar10-c": 200, "cifar100-c": 200, "imagenet-c": 64, "synthetic-c": 50, "fashion-mnist-c": 50}
    assert {n for _, n in PAIRS} >= {"source", "bn_adapt", "tent", "cotta", "ecotta", "psmt"}


@pytest.mark.parametrize("scenario,strategy", PAIRS)
def test_scenario_values_win_over_strategy_and_trainer_defaults(scenario, strategy):
    cfg = compose_config([f"scenario={scenario}", f"strategy={strategy}"])
    for key, value in OWNING[scenario].items():
        assert cfg["trainer"][key] == value, (scenario, strategy, key)


def test_scenario_beats_a_strategy_train_block_which_beats_the_trainer_default():
    train = OmegaConf.load(CONFIGS / "strategy" / "finetune.yaml").train
    cfg = compose_config(["scenario=synthetic-c", "strategy=finetune"])
    assert cfg["trainer"]["batch_size"] == 50 != train.batch_size  # scenario-owned
    assert cfg["trainer"]["lr"] == train.lr and cfg["trainer"]["epochs"] == train.epochs  # strategy train block
    plain = compose_config(["scenario=digits", "strategy=finetune"])  # no scenario value: the strategy's
    assert plain["trainer"]["batch_size"] == train.batch_size
    assert compose_config(["scenario=digits", "strategy=source"])["trainer"]["batch_size"] == 32  # trainer default


def test_the_command_line_and_debug_still_win():
    for scenario in sorted(OWNING):
        cfg = compose_config([f"scenario={scenario}", "strategy=cotta", "trainer.batch_size=7"])
        assert cfg["trainer"]["batch_size"] == 7
    assert compose_config(["scenario=cifar10-c", "strategy=tent", "debug=fast"])["trainer"]["batch_size"] == 16
    cfg = compose_config(["experiment=ecotta_cifar10c", "trainer.batch_size=3"])  # the command line over a preset
    assert cfg["trainer"]["batch_size"] == 3


PRESETS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")
                 if OmegaConf.load(p).get("trainer") and "_" in p.stem
                 and any(f"override /scenario: {s}" in p.read_text() for s in OWNING))


@pytest.mark.parametrize("preset", PRESETS)
def test_an_experiment_preset_wins_over_its_scenario(preset):
    want = OmegaConf.to_container(OmegaConf.load(CONFIGS / "experiment" / f"{preset}.yaml").trainer)
    cfg = compose_config([f"experiment={preset}"])
    assert {k: cfg["trainer"][k] for k in want} == want
