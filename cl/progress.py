"""Console output: a live bar per experience (tqdm, on stderr) and the accuracy-matrix table (rich)."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


class _NullBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def close(self) -> None: ...


def progress_bar(total: int, desc: str, enabled: bool = True):
    if not enabled:
        return _NullBar()
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True, leave=True)


def matrix_table(matrix: list[list[float | None]], title: str = "accuracy matrix (%)") -> str:
    """R[i, j] as text: rows = after training on experience i, columns = tested on experience j."""
    from rich.console import Console
    from rich.table import Table

    n = max((len(r) for r in matrix), default=0)
    table = Table(title=title, title_justify="left")
    table.add_column("trained on \\ tested on", justify="right")
    for j in range(n):
        table.add_column(f"e{j}", justify="right")
    for i, row in enumerate(matrix):
        table.add_row(f"e{i}", *["" if v is None else f"{v:.1f}" for v in row])
    console = Console(width=max(80, 12 + 8 * n), force_terminal=False, color_system=None)
    with console.capture() as cap:
        console.print(table)
    return cap.get()
