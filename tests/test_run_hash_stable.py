"""Run directories from before this session's options keep their hash: new keys that change nothing unless used
(trainer.milestones/gamma outside multistep, scenario.image_cache=exact, the disk budget) are outside the hash.
The expected values were computed with the code of commit de8f3c8."""
import pytest

from cl.cli import compose_config
from cl.results import config_hash

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
