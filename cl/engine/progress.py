"""Console output: a live bar per experience (tqdm, on stderr) and the accuracy-matrix table (rich); and the one
mechanism that makes every other long pass visible and interruptible.

`watch(iterable, desc)` is used by every data pass that is not an SGD step loop: evaluation, feature extraction,
prototype and class-statistics passes, a strategy's own loops (through `cl.engine.data.make_loader`, which returns a
loader that watches itself); a strategy's optimisation phases (cl/engine/phases.py) call `check_stop` before each step
and show a `phase_bar`. It shows a bar once the pass has run for `BAR_DELAY_S` seconds (short passes stay
silent) and polls the run's stop check between items, so a SIGTERM is honoured within one batch in every phase,
not only between optimiser steps: it raises `RunInterrupted(phase=desc)`, and the experience restarts from its
last checkpoint when the same command runs again.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

from cl.engine.errors import RunInterrupted

T = TypeVar("T")
BAR_DELAY_S = 3.0
_watch = {"stop": None, "experience": 0, "enabled": True}


@contextmanager
def stop_checks(stop: Callable[[], str | None], enabled: bool = True):
    """While inside: `watch` polls `stop` and shows bars (unless `enabled` is false, trainer.progress=false)."""
    previous = dict(_watch)
    _watch.update(stop=stop, enabled=enabled)
    try:
        yield
    finally:
        _watch.update(previous)


def set_experience(index: int) -> None:
    """The experience a stop inside a watched pass is reported for."""
    _watch["experience"] = index


def watch(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "batch") -> Iterator[T]:
    stop = _watch["stop"]
    bar = (tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False,
                delay=BAR_DELAY_S) if _watch["enabled"] else None)
    try:
        for item in iterable:
            if stop is not None:
                name = stop()
                if name:
                    raise RunInterrupted(name, experience=_watch["experience"], phase=desc)
            yield item
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def check_stop(desc: str) -> None:
    """Raises `RunInterrupted(phase=desc)` if the run's stop check names a pending signal (as `watch` does
    between items); for loops that are not a pass over an iterable `watch` could wrap (cl/engine/phases.py)."""
    stop = _watch["stop"]
    if stop is not None:
        name = stop()
        if name:
            raise RunInterrupted(name, experience=_watch["experience"], phase=desc)


def phase_bar(total: int | None, desc: str, enabled: bool = True):
    """A strategy's optimisation phase (cl/engine/phases.py): shown after `BAR_DELAY_S`, removed when done, as `watch`'s."""
    if not (enabled and _watch["enabled"]):
        return _NullBar()
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False,
                delay=BAR_DELAY_S)


class _NullBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def close(self) -> None: ...


def progress_bar(total: int, desc: str, enabled: bool = True):
    if not enabled:
        return _NullBar()
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True, leave=True)


def matrix_table(matrix: list[list[float | None]], title: str = "accuracy matrix (%)",
                 rows: list[str] | None = None, cols: list[str] | None = None) -> str:
    """R[i, j] as text: rows = after training on experience i, columns = tested on experience j. `rows`/`cols`
    name them (a kind's domains or class groups); default e0, e1, ..."""
    from rich.console import Console
    from rich.table import Table

    n = max((len(r) for r in matrix), default=0)
    named_cols = cols is not None and len(cols) == n
    named_rows = rows is not None and len(rows) == len(matrix)
    cols = [str(c) for c in cols] if named_cols else [f"e{j}" for j in range(n)]
    rows = [str(r) for r in rows] if named_rows else [f"e{i}" for i in range(len(matrix))]
    table = Table(title=title, title_justify="left")
    table.add_column("trained on \\ tested on", justify="right")
    for name in cols:
        table.add_column(name, justify="right")
    for name, row in zip(rows, matrix):
        table.add_row(name, *["" if v is None else f"{v:.1f}" for v in row])
    col_w = max([8] + [len(c) + 3 for c in cols]) if named_cols else 8
    row_w = max([0] + [len(r) for r in rows]) if named_rows else 0
    console = Console(width=max(80, 12 + row_w + col_w * n), force_terminal=False, color_system=None)
    with console.capture() as cap:
        console.print(table)
    return cap.get()
