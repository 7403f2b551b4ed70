"""The config surface, fuzzed in-process through Hydra's compose API (`cl.app.cli.compose_config`, what `run.py`
composes) and the checks `run_experiment` makes before any work (`cl.app.experiment.check_config`).

Every outcome must be a valid config or a `ClbenchError` with a one-line message: never another exception type,
never a multi-line message. `CLBENCH_FUZZ_EXAMPLES` sets the number of cases (default 200).
"""
import os
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cl.app.cli import compose_config, config_keys, group_options
from cl.engine.errors import ClbenchError

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("CLBENCH_FUZZ_EXAMPLES", "200"))
GROUPS = {g: group_options(g) for g in ("strategy", "scenario", "backbone", "trainer", "debug")}
KEYS = sorted(k for k in config_keys(compose_config(["scenario=synthetic"])) if not k.startswith("hydra"))
OUTCOMES: dict[str, int] = {}

names = st.text(alphabet=string.ascii_lowercase + "-_0", min_size=0, max_size=10)
garbage = st.text(alphabet=string.printable, max_size=16)
values = st.one_of(
    st.integers(-10, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "null", "''", "[]", "[1,2]", "{a: 1}", "adam", "sgd", "skip", "fail", "cpu",
                     "cuda", "bf16", "${seed}", "${nope}", "${oc.env:CLBENCH_NOPE}", "1,2", "[", "a b", "'a,b'"]),
    names,
    garbage,
)


@st.composite
def key(draw) -> str:
    k = draw(st.sampled_from(KEYS))
    mutation = draw(st.sampled_from(["none", "none", "none", "drop", "add", "swap", "random"]))
    if mutation == "drop" and len(k) > 1:
        i = draw(st.integers(0, len(k) - 1))
        k = k[:i] + k[i + 1:]
    elif mutation == "add":
        i = draw(st.integers(0, len(k)))
        k = k[:i] + draw(st.sampled_from("abcrs_.")) + k[i:]
    elif mutation == "swap":
        k = k.rpartition(".")[0] + "." + draw(names) if "." in k else draw(names)
    elif mutation == "random":
        k = draw(st.text(alphabet=string.ascii_letters + "._-~+", min_size=1, max_size=12))
    return k


@st.composite
def override(draw) -> str:
    kind = draw(st.sampled_from(["group", "group", "key", "key", "key", "raw"]))
    if kind == "group":
        group = draw(st.sampled_from(sorted(GROUPS)))
        name = draw(st.one_of(st.sampled_from(GROUPS[group]), names))
        return f"{draw(st.sampled_from(['', '', '+', '~']))}{group}={name}"
    if kind == "key":
        prefix = draw(st.sampled_from(["", "", "", "+", "++", "~"]))
        k = draw(key())
        return f"~{k}" if prefix == "~" and draw(st.booleans()) else f"{prefix}{k}={draw(values)}"
    return draw(garbage)


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
@given(st.lists(override(), min_size=0, max_size=4))
def test_every_config_is_valid_or_one_clear_line(overrides):
    from cl.app.experiment import check_config

    try:
        cfg = compose_config(overrides)
        check_config(cfg)
        outcome = "valid"
    except ClbenchError as exc:
        message = str(exc)
        assert message and "\n" not in message, (overrides, message)
        assert "Traceback" not in message and "HYDRA_FULL_ERROR" not in message, (overrides, message)
        outcome = type(exc).__name__
    OUTCOMES[outcome] = OUTCOMES.get(outcome, 0) + 1


def test_zz_report_the_fuzz_count():
    """Runs after the fuzz test (file order): the number of configs tried, by outcome."""
    total = sum(OUTCOMES.values())
    print(f"\nconfig fuzz: {total} override lists composed: {OUTCOMES}")
    assert total >= EXAMPLES or not OUTCOMES
