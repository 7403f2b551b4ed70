"""Issue 22: config values go one way.

- `experiment` is the last entry of configs/config.yaml's defaults list, so `experiment=x` is plain Hydra (no argv
  rewrite) and a preset still overrides debug and scenario; the old `+experiment=x` fails in one line naming it.
- The trainer reads `strategy.train.*` (configs/trainer/default.yaml); strategies receive the trainer's values at
  setup (`Strategy.trainer_cfg`), never as `${trainer.*}` in their YAML.
- The Avalanche configs share one base through their defaults lists; gs_lora_pp inherits gs_lora.
- The old config forms (the YAML before this change, written out here) resolve to the same values and the same run
  hash, and a run directory the old form made is found and reloaded (every strategy's and preset's hash from before
  is pinned in tests/test_run_hash_stable.py)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import strategies
from cl.app.cli import _compose, compose_config, group_options
from cl.engine.errors import ConfigError
from cl.engine.results import config_hash
from cl.engine.trainer_config import TrainerConfig

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
AVALANCHE = sorted(p for p in (CONFIGS / "strategy" / "avalanche").glob("*.yaml") if not p.name.startswith("_"))
NO_AVALANCHE = "the optional extra `avalanche` is not installed: pip install -e .[avalanche]"
OPTIM = ("epochs", "batch_size", "eval_batch_size", "optimizer", "lr", "momentum", "weight_decay")


# --- experiment= ---------------------------------------------------------------------------------------------------
def test_experiment_is_the_last_default_so_a_preset_beats_debug_and_scenario():
    defaults = list(OmegaConf.load(CONFIGS / "config.yaml").defaults)
    names = [next(iter(d)) if not isinstance(d, str) else d for d in defaults]
    assert names[-1] == "experiment" and defaults[-1]["experiment"] is None
    assert names.index("trainer") < names.index("scenario") < names.index("debug") < names.index("experiment")
    # ecotta_cifar10c sets batch 64; cifar10-c owns 200, debug=fast says 16: the preset wins over both
    assert compose_config(["experiment=ecotta_cifar10c", "debug=fast"])["trainer"]["batch_size"] == 64
    assert compose_config(["experiment=ecotta_cifar10c"])["trainer"]["batch_size"] == 64
    assert compose_config(["experiment=ecotta_cifar10c", "debug=fast", "trainer.batch_size=5"])["trainer"][
        "batch_size"] == 5


def test_experiment_needs_no_rewrite_of_the_overrides():
    """Hydra alone (`cl.app.cli._compose` is hydra.compose) selects the preset; compose_config passes it unchanged."""
    plain = _compose(["experiment=mos_imagenet-r"], resolve=True)
    assert plain["strategy"]["name"] == "mos" and plain["scenario"]["name"] == "imagenet-r-b0inc20"
    plain.pop("hydra", None)
    assert compose_config(["experiment=mos_imagenet-r"]) == plain
    assert "sys.argv[1:] =" not in (ROOT / "run.py").read_text()


@pytest.mark.e2e
def test_run_py_takes_experiment_and_names_the_new_spelling_for_the_old():
    ok = subprocess.run([sys.executable, "run.py", "experiment=mos_imagenet-r", "--cfg", "job", "--package",
                         "strategy"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "name: mos" in ok.stdout
    old = subprocess.run([sys.executable, "run.py", "+experiment=mos_imagenet-r"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert old.returncode == 2
    lines = old.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "write 'experiment=mos_imagenet-r'" in lines[0]


def test_hydras_own_message_for_an_appended_group_is_translated():
    """Past the early check (a group it does not know), Hydra's "Multiple values for ..." becomes the same line."""
    from hydra.errors import ConfigCompositionException

    from cl.app.cli import explain_config_error

    exc = ConfigCompositionException("Multiple values for experiment. To override a value use 'override experiment: x'")
    assert "write 'experiment=x'" in explain_config_error(exc, ["+experiment=x"])


# --- trainer -> strategy, one way -----------------------------------------------------------------------------------
# Removed on branch h-sema (issue 22, SEMA's own loops); drop the entry when that branch is merged.
PENDING: set[str] = set()


def test_no_strategy_config_reads_trainer_values():
    offenders = [str(p.relative_to(CONFIGS)) for p in sorted((CONFIGS / "strategy").rglob("*.yaml"))
                 if "${trainer." in p.read_text() and p.name not in PENDING]
    assert offenders == []


def test_the_trainer_reads_the_strategy_train_block():
    text = (CONFIGS / "trainer" / "default.yaml").read_text()
    assert "${oc.select:strategy.train.epochs," in text
    assert "${strategy." not in text.replace("${oc.select:strategy.train.", "")  # nothing but the train: block


def test_build_hands_the_trainer_values_over_before_setup(monkeypatch):
    seen = {}

    class Probe(strategies.Strategy):
        name = "_probe"

        def setup(self, backbone, info):
            seen["at_setup"] = self.trainer_cfg
            super().setup(backbone, info)

    import scenarios
    from cl.models import backbones

    cfg = compose_config(["scenario=digits", "trainer.lr=0.123"])
    stream = scenarios.build(cfg["scenario"])
    monkeypatch.setattr(strategies, "get_class", lambda name: Probe)  # resolved by name, as a plug-in would be
    monkeypatch.setattr(strategies, "check_supported", lambda name, kind: None)
    s = strategies.build({"name": "_probe"}, backbones.build(cfg["backbone"]), stream.info, trainer=cfg["trainer"])
    assert isinstance(seen["at_setup"], TrainerConfig) and seen["at_setup"].lr == 0.123 and s.trainer_cfg.lr == 0.123
    # a strategy set up without one gets the trainer default
    bare = Probe()
    bare.setup(backbones.build(cfg["backbone"]), stream.info)
    assert bare.trainer_cfg == TrainerConfig()


def _avalanche(*overrides):
    pytest.importorskip("avalanche", reason=NO_AVALANCHE)
    import scenarios
    from cl.models import backbones

    cfg = compose_config(["strategy=avalanche/naive", *overrides])
    stream = scenarios.build(cfg["scenario"])
    return cfg, strategies.build(cfg["strategy"], backbones.build(cfg["backbone"]), stream.info,
                                 trainer=cfg["trainer"])


@pytest.mark.e2e
def test_avalanche_runs_with_the_trainer_values():
    cfg, s = _avalanche("trainer.lr=0.123", "trainer.epochs=3", "trainer.optimizer=sgd", "trainer.momentum=0.5",
                        "debug=fast")
    assert {k: s.hparams[k] for k in OPTIM} == {k: cfg["trainer"][k] for k in OPTIM}
    assert (s.hparams["lr"], s.hparams["epochs"], s.hparams["batch_size"]) == (0.123, 3, 16)
    opt = s.make_optimizer(s.net.parameters())
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.123
    assert opt.param_groups[0]["momentum"] == 0.5
    _, default = _avalanche()
    assert (default.hparams["optimizer"], default.hparams["lr"], default.hparams["epochs"]) == ("adam", 0.001, 5)


def test_an_optimisation_value_in_the_strategy_section_names_the_trainer_field():
    pytest.importorskip("avalanche", reason=NO_AVALANCHE)
    with pytest.raises(ConfigError, match=r"has no field 'lr' \(the trainer's: set trainer.lr\)"):
        strategies.get_class("avalanche/naive")(lr=0.1)
    with pytest.raises(ConfigError, match="did you mean 'strategy.train.lr'"):
        compose_config(["strategy=avalanche/naive", "strategy.lr=0.1"])


@pytest.mark.e2e
def test_mos_takes_the_trainers_weight_decay_for_classifier_alignment():
    import scenarios
    from cl.models import backbones

    def built(*overrides):
        cfg = compose_config(["strategy=mos", "scenario=synthetic", "debug=fast", *overrides])
        stream = scenarios.build(cfg["scenario"])
        return strategies.build(cfg["strategy"], backbones.build(cfg["backbone"]), stream.info,
                                trainer=cfg["trainer"]).h["ca_weight_decay"]

    assert built() == 5e-4  # mos.yaml's train: block, through the trainer
    assert built("trainer.weight_decay=0.25") == 0.25
    assert built("strategy.ca_weight_decay=0.01", "trainer.weight_decay=0.25") == 0.01


@pytest.mark.e2e
def test_gs_lora_takes_the_trainers_lr_for_its_proximal_step():
    from test_gs_lora import _stream  # the tiny forgetting stream

    from cl.models.backbones import Backbone
    from cl.app.testbeds.synthetic_forget import make_vit
    from strategies.gs_lora import GSLoRA

    def set_up(strategy, trainer_cfg):
        body = make_vit({"embed_dim": 32, "depth": 3, "num_heads": 2})
        bb = Backbone(body, name="t", arch="vit", feature_dim=32, input_size=32, in_chans=3, normalize="none",
                      weights_id="random", pretrained=True)
        bb.head = torch.nn.Linear(32, 6)
        strategy.trainer_cfg = trainer_cfg
        strategy.setup(bb, _stream().info)
        return strategy

    assert set_up(GSLoRA(), TrainerConfig(lr=0.07)).prox_lr == 0.07
    assert set_up(GSLoRA(), None).prox_lr == TrainerConfig().lr  # set up without a trainer: the trainer default
    assert set_up(GSLoRA(prox_lr=0.5), TrainerConfig(lr=0.07)).prox_lr == 0.5  # a literal value is kept
    assert compose_config(["strategy=gs_lora"])["strategy"]["prox_lr"] is None


# --- shared YAML ---------------------------------------------------------------------------------------------------
def test_avalanche_configs_share_one_base():
    assert len(AVALANCHE) == 11
    base = OmegaConf.to_container(OmegaConf.load(CONFIGS / "strategy" / "avalanche" / "_base.yaml"))
    for p in AVALANCHE:
        own = OmegaConf.load(p)
        assert list(own.defaults) == ["avalanche/_base@_here_", "_self_"], p.name
        assert "train" not in own and not set(OPTIM) & set(own), p.name
        composed = compose_config([f"strategy=avalanche/{p.stem}"])
        assert composed["strategy"]["train"] == base["train"], p.name
        assert {k: composed["trainer"][k] for k in base["train"]} == base["train"], p.name
    assert "avalanche/_base" not in group_options("strategy")
    with pytest.raises(ConfigError, match="unknown strategy 'avalanche/_base'"):
        compose_config(["strategy=avalanche/_base"])


def test_gs_lora_pp_states_only_what_differs_from_gs_lora():
    own = OmegaConf.to_container(OmegaConf.load(CONFIGS / "strategy" / "gs_lora_pp.yaml"))
    assert own.pop("defaults") == ["gs_lora", "_self_"] and set(own) == {"name", "prototype"}
    pp, base = compose_config(["strategy=gs_lora_pp"]), compose_config(["strategy=gs_lora"])
    assert {k: v for k, v in pp["strategy"].items() if base["strategy"].get(k) != v} == {
        "name": "gs_lora_pp", "prototype": True}
    assert set(pp["strategy"]) == set(base["strategy"]) and pp["trainer"] == base["trainer"]


# --- the old forms -------------------------------------------------------------------------------------------------
OLD_AVALANCHE_TAIL = """# Optimisation: the trainer's fields (train: block below, trainer.* overrides) handed to Avalanche's own loop.
epochs: ${trainer.epochs}
batch_size: ${trainer.batch_size}
eval_batch_size: ${trainer.eval_batch_size}
optimizer: ${trainer.optimizer}
lr: ${trainer.lr}
momentum: ${trainer.momentum}
weight_decay: ${trainer.weight_decay}
train:                    # the same defaults as clbench's finetune, so the two are comparable
  epochs: 5
  batch_size: 32
  optimizer: adam
  lr: 0.001
  weight_decay: 0.0
"""
OLD_GS_LORA_PP = """name: gs_lora_pp
rank: 8
lora_alpha: 1.0
where: [fc1, fc2]
bound: 105.0
beta: [0.2, 0.25, 0.25, 0.2]
lasso_alpha: 1.0e-4
alpha_warmup_epochs: 0
group_prox: false
prox_lr: ${trainer.lr}
val_every: 100
prototype: true
pro_f_weight: 0.01
pro_r_weight: 0.0
bound_pro: 50.0
forget_seed: ${seed}
train:
  epochs: 100
  batch_size: 48
  optimizer: adamw
  lr: 0.01
  weight_decay: 0.05
  scheduler: cosine
"""


@pytest.fixture(scope="module")
def old_configs(tmp_path_factory) -> Path:
    """configs/ as it was before issue 22 for the strategies that changed: each Avalanche config with its own copy
    of the 14-line tail, gs_lora_pp written out in full, `${trainer.*}` copies in gs_lora and mos."""
    root = tmp_path_factory.mktemp("old") / "configs"
    shutil.copytree(CONFIGS, root)
    (root / "strategy" / "avalanche" / "_base.yaml").unlink()
    for p in AVALANCHE:
        lines = [line for line in p.read_text().splitlines(keepends=True)
                 if not line.startswith(("defaults:", "  - avalanche/_base", "  - _self_"))]
        (root / "strategy" / "avalanche" / p.name).write_text("".join(lines) + OLD_AVALANCHE_TAIL)
    (root / "strategy" / "gs_lora_pp.yaml").write_text(OLD_GS_LORA_PP)
    for name, key, value in (("gs_lora", "prox_lr", "${trainer.lr}"),
                             ("mos", "ca_weight_decay", "${trainer.weight_decay}")):
        path = root / "strategy" / f"{name}.yaml"
        lines = [f"{key}: {value}\n" if line.startswith(f"{key}:") else line
                 for line in path.read_text().splitlines(keepends=True)]
        path.write_text("".join(lines))
    return root


def _compose_old(root: Path, overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(root), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name="config", overrides=overrides), resolve=True)
    cfg.pop("hydra", None)
    return cfg


CHANGED = [*(f"avalanche/{p.stem}" for p in AVALANCHE), "gs_lora", "gs_lora_pp", "mos"]
COPIES = {"gs_lora": {"prox_lr": "lr"}, "gs_lora_pp": {"prox_lr": "lr"}, "mos": {"ca_weight_decay": "weight_decay"}}


@pytest.mark.parametrize("name", CHANGED)
@pytest.mark.parametrize("extra", [[], ["debug=fast", "trainer.lr=0.5", "trainer.weight_decay=0.25"]])
def test_the_old_form_resolves_to_the_same_values_and_hash(old_configs, name, extra):
    overrides = [f"strategy={name}", *extra]
    old, new = _compose_old(old_configs, overrides), compose_config(overrides)
    assert old["trainer"] == new["trainer"] and {k: v for k, v in old.items() if k != "strategy"} == {
        k: v for k, v in new.items() if k != "strategy"}
    copies = {k: k for k in OPTIM} if name.startswith("avalanche/") else COPIES[name]
    assert old["strategy"] == {**new["strategy"], **{s: new["trainer"][t] for s, t in copies.items()}}
    assert config_hash(old) == config_hash(new)


@pytest.mark.e2e
def test_a_run_directory_the_old_form_made_is_found_and_reloaded(old_configs, tmp_path, run_quiet):
    overrides = [f"results_root={tmp_path / 'runs'}", "strategy=avalanche/der", "debug=fast", "trainer.progress=false",
                 "trainer.device=cpu"]
    old = _compose_old(old_configs, overrides)
    assert old["strategy"]["lr"] == 0.001  # the old form: the trainer's values copied into the strategy section
    run_dir = tmp_path / "runs" / config_hash(old)  # where the old code put it (its hash function, unchanged for it)
    run_dir.mkdir(parents=True)
    metrics = {"avg_incremental_acc": 50.0, "last_acc": 40.0, "forgetting": 10.0, "bwt": -10.0,
               "task_il": {"last_acc": 90.0}}
    (run_dir / "result.json").write_text(json.dumps({
        "run_id": run_dir.name, "status": "finished", "acc_matrix": [[50.0, 0.0], [30.0, 50.0]], "metrics": metrics,
        "costs": {"per_experience": [], "total_wall_s": 1.0}, "config": old}))
    path, lines = run_quiet(compose_config(overrides))
    assert path == run_dir / "result.json"
    assert any(line == f"run {run_dir.name} already finished; reloading {path}" for line in lines)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [run_dir.name]  # no second directory
