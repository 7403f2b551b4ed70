"""Only what pyproject.toml cannot say: the wheel carries the top-level `configs/` as `cl/configs/`.

`configs/` stays the one source in the repository; an installed `clbench` finds the copy beside its code
(cl/app/plugins.py: builtin_config_dir). An editable install (`pip install -e .`) reads `configs/` in place.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithConfigs(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "cl" / "configs"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(ROOT / "configs", target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        return outputs + [str(Path(self.build_lib) / "cl" / "configs" / p.relative_to(ROOT / "configs"))
                          for p in sorted((ROOT / "configs").rglob("*")) if p.is_file()]


setup(cmdclass={"build_py": BuildPyWithConfigs})
