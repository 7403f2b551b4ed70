#!/usr/bin/env python
"""The README's generated parts, from the code, so that they cannot drift: the strategy × scenario-kind support
table (each strategy's `supports`) and the lists of config names (configs/strategy, scenario, backbone).

    python scripts/readme_tables.py           # print the blocks
    python scripts/readme_tables.py --write   # rewrite them in README.md between their markers
    python scripts/readme_tables.py --check   # exit 1 when README.md differs (tests/test_readme.py runs this)
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("class_il", "task_il", "domain_il", "fscil", "tta", "forgetting", "text", "union_label")


def support_table() -> str:
    import strategies

    rows = ["| strategy | " + " | ".join(f"`{k}`" for k in KINDS) + " |", "|---|" + "---|" * len(KINDS)]
    for name in sorted(strategies.builtin()):  # this repository's own, not an installed plugin's
        supports = strategies.get_class(name).supports
        rows.append(f"| `{name}` | " + " | ".join("✓" if k in supports else "" for k in KINDS) + " |")
    return "\n".join(rows)


def config_lists() -> str:
    from cl.app.cli import CONFIG_DIR, group_options

    out = []
    for group in ("strategy", "scenario", "backbone"):
        names = group_options(group, CONFIG_DIR)  # the built-in configs only, whatever plugins are installed
        out.append(f"- `{group}/` ({len(names)}): " + ", ".join(f"`{n}`" for n in names))
    return "\n".join(out)


BLOCKS = {"support-table": support_table, "config-names": config_lists}


def render(text: str) -> str:
    for name, make in BLOCKS.items():
        pattern = re.compile(rf"(<!-- {name}:start -->\n)(?:.*?\n)?(<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"error: README.md has no <!-- {name}:start --> ... <!-- {name}:end --> block")
        text = pattern.sub(lambda m: m.group(1) + make() + "\n" + m.group(2), text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args(argv)
    readme = ROOT / "README.md"
    current = readme.read_text()
    wanted = render(current)
    if a.write:
        readme.write_text(wanted)
        return 0
    if a.check:
        if wanted != current:
            print("error: README.md's generated blocks are out of date: run python scripts/readme_tables.py --write",
                  file=sys.stderr)
            return 1
        return 0
    for make in BLOCKS.values():
        print(make() + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
