"""Leaderboard: table logic on hand-made result dicts, then md/csv/html/plots from a real tiny sweep."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from cl.app.leaderboard import accuracy_curves, display_table, find_results, summary_table, to_markdown, \
    write_leaderboard

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


def fake(strategy, seed, last, avg, wall=10.0, status="finished", scenario="s", backbone="b", paper=None,
         kind_metrics=None):
    return {"strategy": strategy, "scenario": scenario, "backbone": backbone, "seed": seed, "status": status,
            "metrics": kind_metrics or {"last_acc": last, "avg_incremental_acc": avg, "forgetting": 1.0},
            "acc_matrix": [[80.0, None], [60.0, last]],
            "costs": {"total_wall_s": wall, "per_experience": [
                {"train_images_per_s": 100.0, "peak_memory_mb": 50.0, "trainable_params": 7},
                {"train_images_per_s": 300.0, "peak_memory_mb": 70.0, "trainable_params": 9}]},
            "paper": paper}


def test_mean_std_over_seeds_and_costs():
    t = summary_table([fake("ewc", 0, 40.0, 50.0), fake("ewc", 1, 60.0, 70.0, wall=20.0),
                       fake("ewc", 2, 0.0, 0.0, status="failed")])  # a failed run is not averaged
    row = t.iloc[0]
    # the sample std (ddof=1): sqrt(((40-50)^2 + (60-50)^2) / (2 - 1)) = 14.14
    assert row["n"] == 2 and row["last_acc_mean"] == 50.0 and row["last_acc_std"] == pytest.approx(200 ** 0.5)
    assert row["avg_incremental_acc_mean"] == 60.0 and row["total_wall_s_mean"] == 15.0
    assert row["train_images_per_s_mean"] == 200.0 and row["peak_memory_mb_mean"] == 70.0
    assert row["trainable_params_mean"] == 9
    assert display_table(t).iloc[0]["last_acc"] == "50.00 ± 14.14"


def test_slash_names_side_by_side_and_paper_and_not_run():
    paper = {"source": "x", "last_acc": 85.15}
    t = summary_table([fake("avalanche/ewc", 0, 40.0, 50.0), fake("lae", 0, 70.0, 75.0, paper=paper)],
                      presets={"lae_s": {"strategy": "lae", "scenario": "s", "backbone": "b", "paper": paper},
                               "mos_c": {"strategy": "mos", "scenario": "c", "backbone": "b",
                                         "paper": {"last_acc": 90.0}}})
    d = display_table(t).set_index("strategy")
    assert list(d.index) == ["avalanche/ewc", "lae", "mos"]  # what ran first, then the presets not run
    assert d.loc["lae", "paper"] == "last_acc 85.15" and d.loc["avalanche/ewc", "paper"] == ""
    assert d.loc["mos", "n"] == "not run" and d.loc["mos", "paper"] == "last_acc 90.0"
    assert "avalanche/ewc" in to_markdown(display_table(t))


def test_kind_headline_metrics_mean_error_and_h():
    t = summary_table([fake("tent", 0, 0, 0, kind_metrics={"mean_error": 30.0}),
                       fake("tent", 1, 0, 0, kind_metrics={"mean_error": 40.0}),
                       fake("unl", 0, 0, 0, kind_metrics={"h_mean": 55.0})])
    d = display_table(t).set_index("strategy")
    assert d.loc["tent", "mean_error"] == "35.00 ± 7.07" and d.loc["unl", "h_mean"] == "55.00"


def test_union_label_metrics_and_their_paper_figures():
    paper = {"source": "MoRAM", "transfer": 63.3, "average": 72.7, "last": 80.9}
    xtail = {"transfer": 60.0, "average": 70.0, "last": 80.0}
    t = summary_table([fake("mora", 0, 0, 0, kind_metrics=xtail, paper=paper)])
    d = display_table(t).set_index("strategy")
    assert (d.loc["mora", "transfer"], d.loc["mora", "average"], d.loc["mora", "last"]) == ("60.00", "70.00", "80.00")
    assert d.loc["mora", "paper"] == "transfer 63.3; average 72.7; last 80.9"


def test_accuracy_curves_are_seen_means_over_seeds():
    c = accuracy_curves([fake("a", 0, 40.0, 0), fake("a", 1, 60.0, 0)])
    assert c == {"a | s | b": [80.0, (60 + 40) / 2 / 2 + (60 + 60) / 2 / 2]}


def test_find_results_skips_broken_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "result.json").write_text(json.dumps(fake("x", 0, 1.0, 1.0)))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "result.json").write_text("{half")
    assert [r["strategy"] for r in find_results([tmp_path])] == ["x"]


SWEEP = ["strategy=finetune,simplecil,avalanche/naive", "seed=0,1", "scenario=digits", "debug=fast",
         "scenario.init_cls=4", "scenario.increment=3", "scenario.limit_per_class=6", "trainer.device=cpu",
         "trainer.progress=false"]  # 3 experiences (4+3+3 classes), 6 images per class


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real `run.py -m` multirun with Hydra's basic launcher: native and Avalanche strategies x 2 seeds on the
    tiny digits stream (6 runs, one process)."""
    root = tmp_path_factory.mktemp("sweep")
    p = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", *SWEEP, f"results_root={root / 'runs'}",
                        f"hydra.sweep.dir={root / 'multirun'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert p.stdout.count("result: ") == 6, p.stdout[-2000:]
    return root / "runs"


@pytest.mark.e2e
def test_leaderboard_cli_from_a_sweep(sweep, tmp_path):
    out = tmp_path / "lb"
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "leaderboard.py"), str(sweep), "--out", str(out),
                        "--presets"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.html", "leaderboard.tex", "acc_matrices.png",
                 "acc_curves.png", "acc_vs_cost.png", "acc_matrices.svg"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "leaderboard.md").read_text()
    # native and Avalanche strategies side by side; the presets have no result here: "not run" beside the paper
    for name in ("finetune", "simplecil", "avalanche/naive"):
        assert f"| {name} | digits | resnet-tiny | 2 |" in md, md
    not_run = [line for line in md.splitlines() if "| not run |" in line]
    assert not_run and all(line.rstrip(" |").rsplit("|", 1)[-1].strip() for line in not_run)  # a paper cell
    lines = md.splitlines()
    assert max(i for i, line in enumerate(lines) if "| 2 |" in line) < min(i for i, line in enumerate(lines)
                                                                             if "| not run |" in line)
    assert "| Ā | A<sub>last</sub> | F | BWT |" in md and "sample standard deviation" in md
    tex = (out / "leaderboard.tex").read_text()
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex and r"$\bar{A}$" in tex
    assert r"avalanche/naive & digits & resnet-tiny & 2" in tex and r"$\pm$" in tex
    html = (out / "leaderboard.html").read_text()
    assert '<img src="acc_curves.png">' in html and "avalanche/naive" in html
    import pandas as pd

    csv = pd.read_csv(out / "leaderboard.csv")
    ran = csv[csv["status"] == "run"].sort_values("strategy")
    assert list(ran["strategy"]) == ["avalanche/naive", "finetune", "simplecil"] and list(ran["n"]) == [2, 2, 2]
    assert all(0 <= v <= 100 and not math.isnan(v) for v in ran["last_acc_mean"])
    assert all(s >= 0 and not math.isnan(s) for s in ran["last_acc_std"])  # two seeds: a spread is shown
    # the table's means are the runs' own numbers
    runs = find_results([sweep])
    simple = [r["metrics"]["last_acc"] for r in runs if r["strategy"] == "simplecil"]
    row = ran[ran["strategy"] == "simplecil"].iloc[0]
    assert row["last_acc_mean"] == pytest.approx(sum(simple) / 2)


@pytest.mark.e2e
def test_without_presets_only_real_results(sweep, tmp_path):
    out = tmp_path / "lb"
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "leaderboard.py"), str(sweep), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    md = (out / "leaderboard.md").read_text()
    assert "not run" not in md and md.count("| digits | resnet-tiny | 2 |") == 3


def test_curve_bands_and_chance():
    from cl.app.leaderboard import chance_curve, curve_bands

    runs = [fake("a", 0, 40.0, 0), fake("a", 1, 60.0, 0)]
    b = curve_bands(runs)[("s", "b")]["a"]
    # after experience 2 the seen means are (60+40)/2 = 50 and (60+60)/2 = 60: mean 55, sample std sqrt(50) = 7.07
    assert b["n"] == 2 and b["mean"] == [80.0, 55.0] and b["std"][0] == 0.0
    assert b["std"][1] == pytest.approx(50 ** 0.5)
    r = {"stream": {"kind": "class_il", "classes_per_experience": [[0, 1], [2, 3], [4]]}}
    assert chance_curve(r) == [50.0, 25.0, 20.0]
    assert chance_curve({"stream": {"kind": "tta"}}) is None
