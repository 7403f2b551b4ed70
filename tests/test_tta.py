"""Continual TTA on synthetic-c: end to end for each strategy, and predict-before-update."""
import json
from pathlib import Path

import pytest
import torch

from scenarios.synthetic_c import build_source


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One on-disk cache for the module: the source model trains once."""
    return str(tmp_path_factory.mktemp("tta-data"))


@pytest.fixture(scope="module")
def errors():
    """Mean errors of the runs so far (source runs first)."""
    return {}


@pytest.mark.slow  # the source model trains once (minutes on a loaded 2-core box); see report
@pytest.mark.parametrize("strategy,extra", [("source", ()), ("bn_adapt", ()), ("tent", ()),
                                            ("cotta", ("strategy.n_aug=4",))])
def test_end_to_end_below_source(compose, run_quiet, data_root, errors, strategy, extra):
    cfg = compose(f"strategy={strategy}", "scenario=synthetic-c", "debug=fast", f"data_root={data_root}", *extra)
    path, _ = run_quiet(cfg)
    result = json.loads(Path(path).read_text())
    m = result["metrics"]
    assert len(m["error_per_experience"]) == 4 and "mean_error" in m
    errors[strategy] = m["mean_error"]
    if strategy != "source":
        assert m["mean_error"] < errors["source"]


def test_tent_predicts_before_update(data_root):
    from cl.stream import StreamInfo
    from strategies.tent import Tent

    bb = build_source({"cache_dir": data_root})
    info = StreamInfo(name="t", kind="tta", n_classes=10, n_experiences=1, class_order=list(range(10)))
    tent = Tent()
    tent.setup(bb, info)
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        before = bb(x)
    out = tent.adapt(x)
    assert torch.allclose(out, before)
    with torch.no_grad():
        after = bb(x)
    assert not torch.allclose(after, before)
