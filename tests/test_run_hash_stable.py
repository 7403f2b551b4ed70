"""Run directories from before this session's options keep their hash: new keys that change nothing unless used
(trainer.milestones/gamma outside multistep, scenario.image_cache=exact, the disk budget) are outside the hash.
The expected values were computed with the code of commit de8f3c8.

Issue 22 took the `${trainer.*}` copies out of the strategy configs (Avalanche's seven optimisation fields, MOS's
ca_weight_decay, GS-LoRA's prox_lr; `cl.engine.results.LEGACY_TRAINER_COPIES`): the hash puts them back, so every strategy's
and every preset's hash is the one commit d273746 computed (tests/run_hashes_d273746.json: each strategy on its
own, with debug=fast, and with trainer values overridden; each preset)."""
import json
from pathlib import Path

import pytest

from cl.app.cli import compose_config
from cl.engine.results import config_hash

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("overrides, expected", [
    ([], "79c1314b49b7743b"),
    (["strategy=simplecil", "scenario=synthetic"], "ed616de29e9e5c8e"),
])
def test_hash_of_unchanged_configs_is_the_old_one(overrides, expected):
    assert config_hash(compose_config(overrides)) == expected


def test_speed_only_settings_do_not_move_the_directory():
    base = compose_config(["scenario=imagefolder", "scenario.root=x"])
    assert base["scenario"]["image_cache"] == "exact"
    h = config_hash(base)
    assert config_hash(compose_config(["scenario=imagefolder", "scenario.root=x", "scenario.image_cache=false"])) == h
    assert config_hash(compose_config(["scenario=imagefolder", "scenario.root=x", "scenario.image_cache=true"])) != h
    assert config_hash(compose_config(["trainer.gamma=0.5"])) == config_hash(compose_config([]))


PINNED = json.loads((Path(__file__).parent / "run_hashes_d273746.json").read_text())


@pytest.mark.parametrize("overrides", sorted(PINNED))
def test_hash_is_the_one_from_before_issue_22(overrides):
    assert config_hash(compose_config(overrides.split())) == PINNED[overrides]
