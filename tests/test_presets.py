"""Every paper preset composes, pins its setting and carries the paper's numbers keyed like the result's metrics."""
import json
from pathlib import Path

import pytest

from cl.app.cli import compose_config

pytestmark = pytest.mark.unit

PRESETS = sorted(p.stem for p in (Path(__file__).parent.parent / "configs" / "experiment").glob("*.yaml"))
METRIC_KEYS = {"avg_incremental_acc", "last_acc", "forgetting", "bwt",
               "mean_error",  # tta presets
               "transfer", "average", "last"}  # union_label (X-TAIL) presets
FROM_SCRATCH = {"sparcl", "derpp"}  # their papers train ResNet-18 from scratch: no pre-trained backbone


def preset_strategy(name):
    """The strategy the preset selects in its defaults list (a name such as gs_lora holds an underscore)."""
    text = (Path(__file__).parent.parent / "configs" / "experiment" / f"{name}.yaml").read_text()
    return next(line.split(":", 1)[1].strip() for line in text.splitlines() if "override /strategy:" in line)


def test_there_are_presets():
    assert {"mos_imagenet-r", "adam_cifar100", "simplecil_cub"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_and_pins_its_setting(name):
    cfg = compose_config([f"experiment={name}"])
    strategy = preset_strategy(name)
    assert name.startswith(strategy + "_")
    assert cfg["strategy"]["name"] == strategy
    # paper settings never run on a random backbone, unless the paper trains from scratch
    # (open_clip backbones name their pre-training tag, e.g. pretrained: openai)
    assert (cfg["backbone"]["pretrained"] not in (False, None, "")) is (strategy not in FROM_SCRATCH)
    assert cfg["scenario"]["dataset"] not in ("synthetic", "digits")
    paper = cfg["paper"]
    assert paper["source"]
    numbers = set(paper) & METRIC_KEYS
    assert numbers or "no confirmed number" in paper.get("note", ""), name
    for key in numbers:
        assert 0 <= paper[key] <= 100


def test_the_old_plus_spelling_names_the_new_one():
    """`experiment` is in configs/config.yaml's defaults list (no argv rewrite): `+experiment=x` fails in one line
    that names `experiment=x`, on the command line and in compose_config."""
    from cl.engine.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        compose_config(["+experiment=mos_imagenet-r"])
    message = str(err.value)
    assert "\n" not in message and "write 'experiment=mos_imagenet-r'" in message


def test_mos_imagenet_r_is_the_reference_setting():
    cfg = compose_config(["experiment=mos_imagenet-r"])
    assert cfg["scenario"]["name"] == "imagenet-r-b0inc20" and cfg["scenario"]["increment"] == 20
    assert cfg["backbone"]["arch"] == "vit_base_patch16_224.augreg_in21k"
    t = cfg["trainer"]
    assert (t["epochs"], t["batch_size"], t["lr"], t["weight_decay"]) == (10, 16, 0.05, 0.005)
    # the reference passes the task's weight decay to CA: MOS takes it from the trainer (strategy.ca_weight_decay
    # null), set up in tests/test_mos.py
    assert cfg["strategy"]["ca_weight_decay"] is None
    assert cfg["paper"]["avg_incremental_acc"] == 82.96 and cfg["paper"]["last_acc"] == 77.93


@pytest.mark.e2e
def test_the_result_shows_the_paper_number_beside_the_measured_one(compose, run_quiet):
    # The preset's method and paper numbers on the test-sized stream (no data or weights needed here).
    cfg = compose("experiment=simplecil_cifar100", "scenario=synthetic", "backbone=vit-tiny", "debug=fast")
    path, lines = run_quiet(cfg)
    result = json.loads(path.read_text())
    assert result["paper"]["last_acc"] == 81.26
    assert any(line.startswith("last_acc: measured") and "paper 81.26" in line for line in lines)
