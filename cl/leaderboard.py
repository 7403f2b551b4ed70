"""Leaderboard tables and plots from result.json files (pure functions; `scripts/leaderboard.py` is the CLI).

Why a module: the table logic is tested on hand-made result dicts, without running any experiment."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import pandas as pd

KEYS = ["strategy", "scenario", "backbone"]
# headline metric per scenario kind: tta shows mean error, forgetting kinds show H, union_label (X-TAIL) its
# transfer / average / last (their own KIND_METRICS)
ACCURACY_METRICS = ["avg_incremental_acc", "last_acc", "forgetting", "mean_error", "h_mean", "transfer", "average",
                    "last"]
COST_COLUMNS = ["total_wall_s", "train_images_per_s", "peak_memory_mb", "trainable_params"]


def find_results(paths: Iterable[str | Path]) -> list[dict]:
    """Every result.json under `paths` (files or folders, recursively), each tagged with its path."""
    out = []
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(p.rglob("result.json"))
        for f in files:
            try:
                r = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # a half-written or foreign file is not a result
            r["_path"] = str(f)
            out.append(r)
    return out


def _costs(result: dict) -> dict:
    per = (result.get("costs") or {}).get("per_experience") or []
    last = per[-1] if per else {}
    ips = [c.get("train_images_per_s") for c in per if c.get("train_images_per_s")]
    mem = [c.get("peak_memory_mb") for c in per if c.get("peak_memory_mb") is not None]
    return {"total_wall_s": (result.get("costs") or {}).get("total_wall_s"),
            "train_images_per_s": sum(ips) / len(ips) if ips else None,
            "peak_memory_mb": max(mem) if mem else None,
            "trainable_params": last.get("trainable_params")}


def runs_frame(results: list[dict]) -> pd.DataFrame:
    """One row per run: keys, seed, status, headline metrics and costs."""
    rows = []
    for r in results:
        m = r.get("metrics") or {}
        row = {k: r.get(k) for k in KEYS}
        row.update(seed=r.get("seed"), status=r.get("status"))
        row.update({k: m.get(k) for k in ACCURACY_METRICS})
        row.update(_costs(r))
        rows.append(row)
    return pd.DataFrame(rows, columns=KEYS + ["seed", "status"] + ACCURACY_METRICS + COST_COLUMNS)


def _paper_text(paper: dict | None) -> str:
    if not paper:
        return ""
    vals = [f"{k} {v}" for k, v in paper.items() if k in ACCURACY_METRICS and v is not None]
    return "; ".join(vals) if vals else "see note"


def summary_table(results: list[dict], presets: dict[str, dict] | None = None) -> pd.DataFrame:
    """Mean +- std over seeds per (strategy, scenario, backbone), finished runs only; `n` seeds.

    `presets` maps a preset name to {strategy, scenario, backbone, paper}: each gets a row, "not run" when no
    result matches it, and its paper numbers in the `paper` column."""
    df = runs_frame([r for r in results if r.get("status") == "finished"])
    papers = {}
    for r in results:
        if r.get("paper"):
            papers[tuple(r.get(k) for k in KEYS)] = r["paper"]
    cols = ACCURACY_METRICS + COST_COLUMNS
    num = df[KEYS + cols].copy()
    for c in cols:
        num[c] = pd.to_numeric(num[c], errors="coerce")
    g = num.groupby(KEYS, dropna=False)
    mean, std, n = g.mean(), g.std(ddof=0), g.size()
    table = pd.DataFrame(index=mean.index)
    table["n"] = n
    for c in cols:
        table[c + "_mean"] = mean[c]
        table[c + "_std"] = std[c].where(n > 1)  # one seed has no spread to show
    table = table.reset_index()
    table["paper"] = [_paper_text(papers.get(tuple(row[k] for k in KEYS))) for _, row in table.iterrows()]
    table["status"] = "run"
    for name, p in (presets or {}).items():
        key = tuple(p.get(k) for k in KEYS)
        hit = (table[KEYS] == pd.Series(dict(zip(KEYS, key)))).all(axis=1)
        if hit.any():
            table.loc[hit & (table["paper"] == ""), "paper"] = _paper_text(p.get("paper"))
        else:
            table.loc[len(table)] = {**dict(zip(KEYS, key)), "n": 0, "paper": _paper_text(p.get("paper")),
                                     "status": "not run"}
    return table.sort_values(KEYS).reset_index(drop=True)


def _fmt(mean, std, digits=2) -> str:
    if mean is None or pd.isna(mean):
        return ""
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None and not pd.isna(std) else f"{mean:.{digits}f}"


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The human table: "mean ± std" strings, empty metric columns dropped, "not run" rows marked."""
    out = table[KEYS + ["n"]].copy()
    out["n"] = out["n"].astype(object)
    for c in ACCURACY_METRICS + COST_COLUMNS:
        digits = 0 if c in ("trainable_params", "peak_memory_mb") else 2
        col = [_fmt(m, s, digits) for m, s in zip(table[c + "_mean"], table[c + "_std"])]
        if any(col):
            out[c] = col
    out["paper"] = table["paper"]
    out.loc[table["status"] == "not run", "n"] = "not run"
    return out


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table (pandas' to_markdown needs tabulate, which is not a dependency)."""
    cell = lambda v: "" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def accuracy_curves(results: list[dict]) -> dict[str, list[float]]:
    """Accuracy on all seen experiences after each experience (the matrix's row means), mean over seeds,
    per 'strategy | scenario | backbone'."""
    acc: dict[str, list[list[float]]] = {}
    for r in results:
        rows = r.get("acc_matrix") or []
        curve = []
        for i, row in enumerate(rows):
            seen = [v for v in row[: i + 1] if v is not None]
            curve.append(sum(seen) / len(seen) if seen else float("nan"))
        acc.setdefault(" | ".join(str(r.get(k)) for k in KEYS), []).append(curve)
    out = {}
    for name, curves in acc.items():
        k = min(map(len, curves))
        out[name] = [sum(c[i] for c in curves) / len(curves) for i in range(k)]
    return out


def write_plots(results: list[dict], table: pd.DataFrame, out: Path) -> list[Path]:
    """Heat maps of each group's accuracy matrix (first seed), accuracy-after-each-experience curves, and
    last accuracy against wall time; each as PNG and SVG. Returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    pngs = []

    def save(fig, name):
        for ext in ("png", "svg"):
            fig.savefig(out / f"{name}.{ext}", bbox_inches="tight", dpi=100)
        plt.close(fig)
        pngs.append(out / f"{name}.png")

    finished = [r for r in results if r.get("status") == "finished" and r.get("acc_matrix")]
    firsts: dict[str, dict] = {}
    for r in sorted(finished, key=lambda r: (r.get("seed") is None, r.get("seed"))):
        firsts.setdefault(" | ".join(str(r.get(k)) for k in KEYS), r)
    if firsts:
        n = len(firsts)
        fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.2), squeeze=False)
        for k, (ax, (name, r)) in enumerate(zip(axes[0], sorted(firsts.items()))):
            m = [[float("nan") if v is None else v for v in row] for row in r["acc_matrix"]]
            im = ax.imshow(m, vmin=0, vmax=100, cmap="viridis")
            ax.set_title(name.replace(" | ", "\n") + f"\n(seed {r.get('seed')})", fontsize=7)
            ax.set_xticks(range(len(m[0]) if m else 0))
            ax.set_yticks(range(len(m)))
            ax.set_xlabel("evaluated on experience")
            if k == 0:  # one shared label: repeated ones run into the neighbouring panel
                ax.set_ylabel("after training experience")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy %")
        save(fig, "acc_matrices")
    curves = accuracy_curves(finished)
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, c in sorted(curves.items()):
            ax.plot(range(1, len(c) + 1), c, marker="o", label=name)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("experiences trained")
        ax.set_ylabel("accuracy on seen experiences %")
        ax.legend(fontsize=7)
        save(fig, "acc_curves")
    run = table[table["status"] == "run"].dropna(subset=["last_acc_mean", "total_wall_s_mean"])
    if len(run):
        fig, ax = plt.subplots(figsize=(6, 4))
        for _, row in run.iterrows():
            ax.errorbar(row["total_wall_s_mean"], row["last_acc_mean"], yerr=row["last_acc_std"],
                        xerr=row["total_wall_s_std"], fmt="o", capsize=3,
                        label=" | ".join(str(row[k]) for k in KEYS))
        ax.set_xlabel("wall time per run (s), mean ± std over seeds")
        ax.set_ylabel("last accuracy %")
        ax.legend(fontsize=7)
        save(fig, "acc_vs_cost")
    return pngs


def write_leaderboard(results: list[dict], out: Path, presets: dict[str, dict] | None = None) -> dict[str, Path]:
    """Writes leaderboard.md/.csv/.html (plots embedded) and the plots under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = summary_table(results, presets)
    shown = display_table(table)
    table.to_csv(out / "leaderboard.csv", index=False)
    md = to_markdown(shown)
    failed = [r for r in results if r.get("status") not in ("finished", None)]
    if failed:
        md += "\n\nUnfinished runs:\n" + "\n".join(
            f"- {r.get('strategy')} {r.get('scenario')} seed {r.get('seed')}: {r.get('status')}"
            f"{' (' + str(r.get('failure')) + ')' if r.get('failure') else ''} [{r['_path']}]" for r in failed)
    (out / "leaderboard.md").write_text(md + "\n")
    pngs = write_plots(results, table, out)
    imgs = "".join(f'<h2>{p.stem}</h2><img src="{p.name}">' for p in pngs)
    (out / "leaderboard.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>clbench leaderboard</title></head><body>"
        f"<h1>clbench leaderboard</h1>{shown.to_html(index=False)}{imgs}</body></html>\n")
    return {"md": out / "leaderboard.md", "csv": out / "leaderboard.csv", "html": out / "leaderboard.html"}
