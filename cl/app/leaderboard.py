"""Leaderboard tables and plots from result.json files (pure functions; `scripts/leaderboard.py` is the CLI).

Why a module: the table logic is tested on hand-made result dicts, without running any experiment."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import pandas as pd

KEYS = ["strategy", "scenario", "backbone"]
# headline metric per scenario kind: tta shows mean error, forgetting kinds show H, union_label (X-TAIL) its
# transfer / average / last (each kind's own metrics: cl/engine/kind_metrics.py)
ACCURACY_METRICS = ["avg_incremental_acc", "last_acc", "forgetting", "bwt", "mean_error", "h_mean", "transfer",
                    "average", "last"]
# Column headers as papers write them (Markdown/HTML, and LaTeX); the CSV keeps the code identifiers.
SYMBOLS = {"avg_incremental_acc": "Ā", "last_acc": "A<sub>last</sub>", "forgetting": "F", "bwt": "BWT",
           "mean_error": "mean error", "h_mean": "H", "transfer": "Transfer", "average": "Average", "last": "Last",
           "total_wall_s": "wall (s)", "train_images_per_s": "train img/s", "peak_memory_mb": "peak MB",
           "trainable_params": "trainable params"}
LATEX_SYMBOLS = {**SYMBOLS, "avg_incremental_acc": r"$\bar{A}$", "last_acc": r"$A_\mathrm{last}$",
                 "forgetting": r"$F$", "h_mean": r"$H$"}
SPREAD_NOTE = "mean ± sample standard deviation (n − 1 in the denominator) over n seeds; one seed shows no spread"
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
    """Mean ± sample std (ddof=1) over seeds per (strategy, scenario, backbone), finished runs only; `n` seeds.

    `presets` maps a preset name to {strategy, scenario, backbone, paper}: each gets a row, "not run" when no
    result matches it, and its paper numbers in the `paper` column. Rows that ran come first, then the presets
    not run."""
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
    mean, std, n = g.mean(), g.std(ddof=1), g.size()  # the sample std: seeds are a sample of the method's runs
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
    table["_not_run"] = table["status"] == "not run"
    return table.sort_values(["_not_run", "scenario", "backbone", "strategy"]).drop(columns="_not_run") \
        .reset_index(drop=True)


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


def with_symbols(df: pd.DataFrame, symbols: dict[str, str] = SYMBOLS) -> pd.DataFrame:
    """The display table with the papers' column names (Ā, A_last, F, BWT, ...)."""
    return df.rename(columns=symbols)


def to_latex(df: pd.DataFrame) -> str:
    """A booktabs table (`\\usepackage{booktabs}`), the papers' symbols as headers, ± as $\\pm$."""
    def esc(v) -> str:
        text = "" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v)
        for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
            text = text.replace(a, b)
        return text.replace(" ± ", r" $\pm$ ")
    cols = [LATEX_SYMBOLS.get(c, esc(c)) for c in df.columns]
    spec = "l" * len(KEYS) + "r" * (len(df.columns) - len(KEYS))
    lines = [r"\begin{tabular}{" + spec + "}", r"\toprule", " & ".join(cols) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(v) for v in row) + r" \\" for row in df.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


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


def _seen_curve(result: dict) -> list[float]:
    rows = result.get("acc_matrix") or []
    out = []
    for i, row in enumerate(rows):
        seen = [v for v in row[: i + 1] if v is not None]
        out.append(sum(seen) / len(seen) if seen else float("nan"))
    return out


def curve_bands(results: list[dict]) -> dict[tuple, dict[str, dict]]:
    """Per (scenario, backbone), per strategy: the seen-accuracy curve's mean and sample std over seeds, and n."""
    import numpy as np

    grouped: dict[tuple, dict[str, list[list[float]]]] = {}
    for r in results:
        curve = _seen_curve(r)
        if curve:
            grouped.setdefault((r.get("scenario"), r.get("backbone")), {}).setdefault(r.get("strategy"), []).append(curve)
    out: dict[tuple, dict[str, dict]] = {}
    for key, by_strategy in grouped.items():
        for name, curves in by_strategy.items():
            k = min(map(len, curves))
            a = np.array([c[:k] for c in curves], dtype=float)
            std = a.std(axis=0, ddof=1) if len(a) > 1 else np.zeros(k)
            out.setdefault(key, {})[name] = {"mean": a.mean(axis=0).tolist(), "std": std.tolist(), "n": len(a)}
    return out


def chance_curve(result: dict) -> list[float] | None:
    """Chance accuracy on the seen classes after each experience (class- and few-shot-incremental streams: 100 /
    classes seen); None where chance is not one number per stage."""
    stream = result.get("stream") or {}
    per = stream.get("classes_per_experience")
    if stream.get("kind") not in ("class_il", "fscil") or not per:
        return None
    seen, out = 0, []
    for classes in per:
        seen += len(classes)
        out.append(100.0 / seen if seen else float("nan"))
    return out


UPPER_BOUND = "joint"  # the strategy drawn as the upper bound when it ran on the same stream


def write_plots(results: list[dict], table: pd.DataFrame, out: Path) -> list[Path]:
    """Accuracy matrices (first seed of each group, a grid of at most 4 columns), seen-accuracy curves per
    (scenario, backbone) with a band of ± one sample std over seeds, the chance level and the upper bound, and last
    accuracy against wall time; each as PNG and SVG. Returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    pngs = []

    def save(fig, name):
        for ext in ("png", "svg"):
            fig.savefig(out / f"{name}.{ext}", bbox_inches="tight", dpi=110)
        plt.close(fig)
        pngs.append(out / f"{name}.png")

    finished = [r for r in results if r.get("status") == "finished" and r.get("acc_matrix")]
    firsts: dict[tuple, dict] = {}
    for r in sorted(finished, key=lambda r: (r.get("seed") is None, r.get("seed"))):
        firsts.setdefault(tuple(r.get(k) for k in ("scenario", "backbone", "strategy")), r)
    if firsts:
        n = len(firsts)
        cols = min(4, n)
        rows = -(-n // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.9 * rows), squeeze=False, layout="constrained")
        for k, ax in enumerate(axes.flat):
            if k >= n:
                ax.axis("off")
                continue
            (scenario, backbone, strategy), r = sorted(firsts.items(), key=lambda kv: tuple(map(str, kv[0])))[k]
            m = [[float("nan") if v is None else v for v in row] for row in r["acc_matrix"]]
            im = ax.imshow(m, vmin=0, vmax=100, cmap="viridis")
            # one item per line: side by side, long scenario and backbone names ran into the next panel's title
            ax.set_title(f"{strategy}\n{scenario}\n{backbone} · seed {r.get('seed')}", fontsize=8)
            size = len(m[0]) if m else 0
            step = max(1, -(-size // 8))  # at most 8 tick labels per axis (15 TTA domains: 0, 2, 4, ...)
            ax.set_xticks(range(0, size, step))
            ax.set_yticks(range(0, len(m), step))
            if k % cols == 0:
                ax.set_ylabel("after training on")
            if k // cols == rows - 1 or k + cols >= n:
                ax.set_xlabel("tested on experience")
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="accuracy %")
        save(fig, "acc_matrices")
    bands = curve_bands(finished)
    if bands:
        keys = sorted(bands, key=lambda k: tuple(map(str, k)))
        cols = min(3, len(keys))
        rows = -(-len(keys) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.6 * rows), squeeze=False, layout="constrained")
        for ax, key in zip(axes.flat, keys):
            for name, b in sorted(bands[key].items()):
                x = list(range(1, len(b["mean"]) + 1))
                lo = [m - s for m, s in zip(b["mean"], b["std"])]
                hi = [m + s for m, s in zip(b["mean"], b["std"])]
                style = {"color": "black", "linestyle": "--"} if name == UPPER_BOUND else {}
                label = f"{name} (upper bound)" if name == UPPER_BOUND else name
                line, = ax.plot(x, b["mean"], marker="o", markersize=3, label=f"{label} (n={b['n']})", **style)
                if b["n"] > 1:
                    ax.fill_between(x, lo, hi, alpha=0.2, color=line.get_color(), linewidth=0)
            sample = next(r for r in finished if (r.get("scenario"), r.get("backbone")) == key)
            chance = chance_curve(sample)
            if chance:
                ax.plot(range(1, len(chance) + 1), chance, color="grey", linestyle=":", label="chance")
            ax.set_title(f"{key[0]} · {key[1]}", fontsize=10)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_ylim(0, 100)
            ax.set_xlabel("experiences trained (TTA: domains adapted to)")
            ax.set_ylabel("accuracy on seen data % (TTA: online)")
            # below the axes: inside, a legend of 7+ methods hid the curves it names
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, frameon=False)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.suptitle("band: ± one sample std over seeds", fontsize=8)
        save(fig, "acc_curves")
    run = table[table["status"] == "run"].dropna(subset=["last_acc_mean", "total_wall_s_mean"])
    if len(run):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for _, row in run.iterrows():
            ax.errorbar(row["total_wall_s_mean"], row["last_acc_mean"],
                        yerr=0 if pd.isna(row["last_acc_std"]) else row["last_acc_std"],
                        xerr=0 if pd.isna(row["total_wall_s_std"]) else row["total_wall_s_std"], fmt="o", capsize=3,
                        label=" | ".join(str(row[k]) for k in KEYS))
        ax.set_xscale("log")
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 10 20 50 100 ...: plain, uncrowded
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("wall time per run (s, log scale), mean ± sample std over seeds")
        ax.set_ylabel("last accuracy %")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        save(fig, "acc_vs_cost")
    return pngs


def write_leaderboard(results: list[dict], out: Path, presets: dict[str, dict] | None = None) -> dict[str, Path]:
    """Writes leaderboard.md/.csv/.html/.tex (plots embedded in the HTML) and the plots under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = summary_table(results, presets)
    shown = display_table(table)
    table.to_csv(out / "leaderboard.csv", index=False)
    md = to_markdown(with_symbols(shown)) + f"\n\n{SPREAD_NOTE}."
    failed = [r for r in results if r.get("status") not in ("finished", None)]
    if failed:
        md += "\n\nUnfinished runs:\n" + "\n".join(
            f"- {r.get('strategy')} {r.get('scenario')} seed {r.get('seed')}: {r.get('status')}"
            f"{' (' + str(r.get('failure')) + ')' if r.get('failure') else ''} [{r['_path']}]" for r in failed)
    (out / "leaderboard.md").write_text(md + "\n")
    (out / "leaderboard.tex").write_text(f"% {SPREAD_NOTE}\n" + to_latex(shown) + "\n")
    pngs = write_plots(results, table, out)
    imgs = "".join(f'<h2>{p.stem}</h2><img src="{p.name}">' for p in pngs)
    (out / "leaderboard.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>clbench leaderboard</title></head><body>"
        f"<h1>clbench leaderboard</h1>{with_symbols(shown).to_html(index=False, escape=False)}"
        f"<p>{SPREAD_NOTE}.</p>{imgs}</body></html>\n")
    return {"md": out / "leaderboard.md", "csv": out / "leaderboard.csv", "html": out / "leaderboard.html",
            "tex": out / "leaderboard.tex"}
