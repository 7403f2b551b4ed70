"""`python run.py` with no arguments: the default stream under each strategy of config.yaml's `compare` list, then
their leaderboard.

Why: the one command a newcomer types should show what the framework is for (a lower bound, a method and an upper
bound on one stream, side by side), not one run's matrix. Each strategy runs exactly as `python run.py
strategy=<name>` would (the same config, hash and run directory), so the comparison resumes and reloads like any
run, and the table is `cl/app/leaderboard.py`'s. Any command-line argument skips all this: one run, as always.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from cl.engine.errors import ConfigError

# The plain-text header of A_last: the table is printed to a terminal, not rendered as HTML.
TERMINAL_SYMBOLS = {"last_acc": "A_last"}


def compared_strategies(cfg: dict) -> list[str]:
    """config.yaml's `compare` list, checked: strategy names known to configs/strategy (a one-line error if not)."""
    from cl.app.cli import check_group_overrides

    names = cfg.get("compare") or []
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"compare (configs/config.yaml) must be a list of strategy names, got {names!r}")
    problem = check_group_overrides([f"strategy={n}" for n in names])
    if problem:
        raise ConfigError(f"compare (configs/config.yaml): {problem}")
    return list(names)


def run_comparison(names: Sequence[str], out: Callable[[str], None] = print) -> list[Path]:
    """Runs (or resumes, or reloads) `python run.py strategy=<name>` for each name in turn; their result paths."""
    from cl.app.cli import compose_config
    from cl.app.experiment import run_experiment

    paths = []
    for i, name in enumerate(names, 1):
        out(f"\n[{i}/{len(names)}] python run.py strategy={name}")
        path = run_experiment(compose_config([f"strategy={name}"]), out=out)
        out(f"result: {path}")
        paths.append(path)
    return paths


def comparison_table(results: list[dict], order: Sequence[str]) -> str:
    """The leaderboard's Markdown table of `results` (mean ± std over seeds), rows in `order`, empty columns out."""
    from cl.app.leaderboard import SYMBOLS, display_table, summary_table, to_markdown, with_symbols

    shown = display_table(summary_table(results))
    rank = {name: i for i, name in enumerate(order)}
    shown = shown.sort_values("strategy", key=lambda s: s.map(lambda n: rank.get(n, len(rank))), kind="stable")
    shown = shown[[c for c in shown.columns if (shown[c].astype(str) != "").any()]]  # `paper`: none on digits
    return to_markdown(with_symbols(shown, {**SYMBOLS, **TERMINAL_SYMBOLS}))


def main(out: Callable[[str], None] = print) -> bool:
    """The comparison, when config.yaml has a `compare` list: False (nothing done) when it has none.

    Raises what `run_experiment` raises (`ClbenchError`, `RunInterrupted`, ...); run.py turns them into its exit
    codes."""
    from cl.app.cli import compose_config
    from cl.app.leaderboard import find_results

    names = compared_strategies(compose_config([]))
    if not names:
        return False
    out(f"comparing {', '.join(names)} on the default stream (compare: in configs/config.yaml); any argument runs "
        f"one run instead")
    paths = run_comparison(names, out)
    out(f"\nleaderboard of these {len(paths)} runs (one seed; more seeds: python run.py -m "
        f"strategy={','.join(names)} seed=1993,1,2, then python scripts/leaderboard.py results/runs):")
    out(comparison_table(find_results(paths), names))
    return True
