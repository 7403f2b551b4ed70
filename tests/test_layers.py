"""The layer rules are import-linter contracts (pyproject.toml, [tool.importlinter]); CI runs them here."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


def test_import_linter_contracts_hold_with_no_exceptions():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    out = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_no_contract_has_ignores():
    text = (ROOT / "pyproject.toml").read_text()
    section = text[text.index("[tool.importlinter]"):]
    assert "ignore_imports" not in section and "unmatched_ignore" not in section


# import-linter sees import statements; a lazy "module:attr" registry string is an import it cannot see.
UPWARD = {
    "cl/engine": ("cl.models", "cl.app", "scenarios", "strategies"),
    "cl/models": ("cl.app", "scenarios", "strategies"),
    "strategies": ("cl.app", "scenarios", "cl.engine.trainer"),
    "scenarios": ("cl.app", "strategies"),
}


def test_no_lazy_registry_string_points_to_a_higher_layer():
    import ast
    import re

    bad = []
    for folder, forbidden in UPWARD.items():
        pattern = re.compile(r"^(%s)(\.\w+)*(:\w+)?$" % "|".join(re.escape(f) for f in forbidden))
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                        and node.value not in ("scenarios", "strategies") and pattern.match(node.value):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not bad, "\n".join(bad)
