"""Plugins (issue 22): strategies found by their declared name (no hand-kept table), and another installed package's
strategy, dataset reader, backbone source and config folder joining through entry points (cl/app/plugins.py).

The plugin is tests/plugin_pkg, installed with pip into a temporary `--target` folder that PYTHONPATH names, so
importlib.metadata sees its entry points exactly as it would in site-packages.
"""
import ast
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
ENV = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def declared_names_by_ast() -> dict[str, str]:
    """What the registry's line scan must find, found the slow, sure way."""
    found = {}
    for path in sorted((ROOT / "strategies").glob("*.py")):
        if path.name.startswith("_"):
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    if (isinstance(stmt, ast.Assign) and [getattr(t, "id", None) for t in stmt.targets] == ["name"]
                            and isinstance(stmt.value, ast.Constant)):
                        found[stmt.value.value] = f"strategies.{path.stem}:{node.name}"
    return found


def test_strategies_are_found_by_their_declared_name():
    import strategies

    assert strategies.builtin() == declared_names_by_ast()
    assert {"finetune", "simplecil", "avalanche/icarl", "gs_lora_pp"} <= set(strategies.builtin())


def test_every_strategy_has_its_yaml_and_every_yaml_its_strategy():
    import strategies

    base = ROOT / "configs" / "strategy"
    yamls = {str(p.relative_to(base).with_suffix("")): yaml.safe_load(p.read_text())["name"] for p in base.rglob("*.yaml")
             if not p.name.startswith("_")}  # `_` files are shared parts (avalanche/_base.yaml), not strategies
    assert all(file == name for file, name in yamls.items()), yamls
    assert set(yamls) == set(strategies.builtin())


def test_discovery_imports_no_strategy_module_nor_optional_dependency():
    code = ("import sys, time; t = time.perf_counter(); import strategies; n = strategies.names(); "
            "dt = time.perf_counter() - t; "
            "bad = [m for m in sys.modules if m.startswith('strategies.') or m.split('.')[0] in "
            "('avalanche', 'open_clip', 'transformers', 'timm')]; print(len(n), bad, dt)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**ENV, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    count, bad, _ = proc.stdout.split(" ", 2)
    assert int(count) >= 30 and bad.startswith("[]"), proc.stdout


def test_a_plugin_entry_point_must_name_a_strategy_with_that_name(monkeypatch):
    import strategies
    from cl.engine import entry_points as plugins
    from cl.engine.errors import ConfigError

    fake = {"odd": EntryPoint(name="odd", value="strategies.finetune:Finetune", group="clbench.strategies")}
    monkeypatch.setattr(plugins, "entry_points", lambda kind: fake if kind == "strategies" else {})
    assert "odd" in strategies.names()
    with pytest.raises(ConfigError, match="strategy 'odd' = strategies.finetune:Finetune is not"):
        strategies.get_class("odd")


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> str:
    """tests/plugin_pkg installed with pip (no build isolation: nothing is downloaded) into a --target folder."""
    tmp = tmp_path_factory.mktemp("plugin")
    src = tmp / "src"
    shutil.copytree(ROOT / "tests" / "plugin_pkg", src)  # the build writes build/ and *.egg-info beside its sources
    target = tmp / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(target), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return str(target)


def run_cli(*args: str, pythonpath: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env={**ENV, "PYTHONPATH": pythonpath, **env})


def test_a_plugin_strategy_dataset_and_backbone_run_end_to_end(plugin_path, tmp_path):
    proc = run_cli("strategy=ncm", "scenario=plugin-digits", "debug=smoke", "trainer.device=cpu",
                   "trainer.progress=false", f"results_root={tmp_path}", pythonpath=f"{ROOT}{os.pathsep}{plugin_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(Path(proc.stdout.strip().splitlines()[-1].removeprefix("result: ")).read_text())
    assert result["status"] == "finished"
    assert result["config"]["strategy"]["name"] == "ncm"
    assert result["config"]["scenario"]["dataset"] == "plugin-digits"
    assert result["config"]["backbone"]["source"] == "plugin-flat"
    assert result["metrics"]["last_acc"] > 0.5  # nearest class mean on digits' pixels is far above chance


def test_the_early_name_check_sees_plugin_configs(plugin_path):
    proc = run_cli("strategy=ncn", pythonpath=f"{ROOT}{os.pathsep}{plugin_path}")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown strategy 'ncn' (did you mean 'ncm'?)"), proc.stderr
    without = run_cli("strategy=ncm", pythonpath=str(ROOT))
    assert without.returncode == 2 and "unknown strategy 'ncm'" in without.stderr


@pytest.fixture
def user_configs(tmp_path) -> Path:
    folder = tmp_path / "my_configs"
    (folder / "strategy").mkdir(parents=True)
    (folder / "strategy" / "simplecil-64.yaml").write_text("name: simplecil\neval_batch_size: 64\n")
    return folder


def test_a_user_config_folder_joins_through_the_environment(user_configs, monkeypatch):
    from cl.app.cli import check_group_overrides, compose_config
    from cl.engine.errors import ConfigError

    assert "unknown strategy 'simplecil-64'" in check_group_overrides(["strategy=simplecil-64"])
    monkeypatch.setenv("CLBENCH_CONFIG_PATH", str(user_configs))
    assert check_group_overrides(["strategy=simplecil-64"]) is None
    assert compose_config(["strategy=simplecil-64"])["strategy"]["eval_batch_size"] == 64
    monkeypatch.setenv("CLBENCH_CONFIG_PATH", str(user_configs / "nope"))
    with pytest.raises(ConfigError, match="CLBENCH_CONFIG_PATH names '.*nope', which is not a folder"):
        compose_config(["strategy=finetune"])


def test_a_user_config_folder_joins_through_hydra_searchpath(user_configs):
    from cl.app.cli import check_group_overrides, compose_config

    over = [f"hydra.searchpath=[file://{user_configs}]", "strategy=simplecil-64"]
    assert check_group_overrides(over) is None
    assert compose_config(over)["strategy"]["eval_batch_size"] == 64
