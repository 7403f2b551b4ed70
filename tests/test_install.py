"""Installable without -e (issue 22): the wheel carries configs/ and `clbench` runs the embedded default from any
folder, with nothing of the checkout on the path.

The wheel is installed with `pip install --no-deps --target` (this interpreter's torch and the rest stay as they
are; nothing is downloaded) and run with PYTHONPATH naming only that folder, from an empty working directory.
"""
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("cl", "scenarios", "strategies", "configs", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the --target folder it is installed in), built from a copy of the checkout's package files."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info")
    for name in SOURCES:  # a copy: the build writes build/ and *.egg-info beside the sources
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, src / name,
                                                                      **({"ignore": ignore} if (ROOT / name).is_dir() else {}))
    wheels = tmp / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                           "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = wheels.glob("clbench-*.whl")
    target = tmp / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return wheel, target


def test_the_wheel_carries_every_config_and_the_command(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"cl/configs/{p.relative_to(ROOT / 'configs').as_posix()}" for p in (ROOT / "configs").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert configs and configs <= names, sorted(configs - names)[:5]
    # package data: the RobustBench ImageNet-C id list (pyproject.toml [tool.setuptools.package-data])
    assert "scenarios/datasets/data/imagenet_test_image_ids.txt" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "clbench = cl.app.run:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def run_installed(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_clbench_runs_the_embedded_default_from_an_empty_folder(installed, tmp_path):
    _, target = installed
    where = run_installed(target, tmp_path, "-c", "import cl, cl.app.plugins as p; print(cl.__file__); "
                                                  "print(p.builtin_config_dir())")
    assert where.returncode == 0, where.stderr
    assert [Path(line).is_relative_to(target) for line in where.stdout.split()] == [True, True], where.stdout
    # The console script pip wrote (its first line names this interpreter; run through it explicitly).
    proc = run_installed(target, tmp_path, str(target / "bin" / "clbench"), "debug=smoke", "trainer.device=cpu",
                         "trainer.progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = Path(proc.stdout.strip().splitlines()[-1].removeprefix("result: "))
    assert path.is_relative_to(tmp_path / "results" / "runs")  # results default to the working directory, as before
    result = json.loads(path.read_text())
    assert result["status"] == "finished"
    assert (result["config"]["strategy"]["name"], result["config"]["scenario"]["name"],
            result["config"]["backbone"]["name"]) == ("finetune", "digits", "resnet-tiny")


def test_python_dash_m_cl_checks_names_against_the_installed_configs(installed, tmp_path):
    _, target = installed
    proc = run_installed(target, tmp_path, "-m", "cl", "strategy=simplecl")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown strategy 'simplecl' (did you mean 'simplecil'?)"), proc.stderr
