"""Print pyproject.toml's lower bounds as exact pins, one `name==version` a line, for `make test-oldest`.

Usage: `python tools/lower_bounds.py [--build-system] [EXTRA ...]` prints the `name>=X` requirements of the core
dependencies and of the named extras (and, with `--build-system`, of `[build-system] requires`) as `name==X`, torch
excepted: it stays on the CPU build the Makefile pins. Requirements without a lower bound are left out.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

LOWER_BOUND = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*>=\s*([^,;\s]+)")


def lower_bounds(pyproject: dict, extras: list[str], build_system: bool = False) -> list[str]:
    """`name==X` for every `name>=X` among the dependencies and the given extras (an unknown extra is an error), and the
    build requirements with `build_system`."""
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(f"unknown extra(s) {unknown}; pyproject.toml has {sorted(optional)}")
    requirements = list(project["dependencies"]) + [req for extra in extras for req in optional[extra]]
    if build_system:
        requirements += pyproject["build-system"]["requires"]
    pins = []
    for requirement in requirements:
        match = LOWER_BOUND.match(requirement)
        if match and match.group(1).lower() != "torch":
            pins.append(f"{match.group(1)}=={match.group(2)}")
    return pins


if __name__ == "__main__":
    with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as f:
        args = sys.argv[1:]
        print(
            "\n".join(
                lower_bounds(tomllib.load(f), [a for a in args if a != "--build-system"], "--build-system" in args)
            )
        )
