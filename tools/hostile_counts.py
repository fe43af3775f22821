"""Count the hostile inputs the test suite tries (`tests/test_hostile_*.py`) and what each is checked to do.

Usage: `python tools/hostile_counts.py [--run] [--json]` from the repository root.

Each file attacks one feature (`FEATURES`). Every collected test case counts as one hostile input (each
parametrization is a case; a test that loops over several inputs, such as a save killed at each of its file
operations, counts once). A case is checked to give a **clear
error** when its test function calls `pytest.raises` (the error's type and message, naming the field, file, function
or row, are matched), and to give the **correct result** otherwise (its numbers or files are compared with a reference
or a hand-worked value). Without `--run` the cases are only collected (a few seconds); with `--run` they are run too and
the table adds how many passed.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import json
import os
import sys
import textwrap
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The feature each file attacks (the table's first column); a file not listed is named by itself.
FEATURES = {
    "test_hostile_checkpoints.py": "checkpoints and the Hub: save, load, resume",
    "test_hostile_cli.py": "the command line: trl-qhead train / eval / demo flags",
    "test_hostile_config.py": "QHeadConfig: float fields, settings candidate labels refuse",
    "test_hostile_data.py": "data preparation: columns, messages, masks, rewards float32 cannot hold, prompt_length",
    "test_hostile_decoding.py": "decoding: tilt betas, RewardLookahead's k and prompts",
    "test_hostile_gvpo.py": "GVPO: member masks, offline rows, the trainer's model source",
    "test_hostile_rewards.py": "rewards: multi-turn rows, normalisation, float32 overflow, prefix-score memo",
    "test_hostile_soft.py": "soft targets: LINEX at extreme targets and betas, mask weights, lookahead values",
}


def raises_checked(function) -> bool:
    """Whether the test function's own body calls `pytest.raises`."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "raises":
            if isinstance(node.func.value, ast.Name) and node.func.value.id == "pytest":
                return True
    return False


class _Recorder:
    """A pytest plugin: the kind of each collected case and, when run, its outcome."""

    def __init__(self):
        self.kinds: dict[str, tuple[str, str]] = {}  # nodeid -> (file, "clear error" | "correct result")
        self.passed: set[str] = set()

    def pytest_collection_modifyitems(self, items):
        for item in items:
            kind = "clear error" if raises_checked(item.function) else "correct result"
            self.kinds[item.nodeid] = (Path(item.fspath).name, kind)

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and report.passed:
            self.passed.add(report.nodeid)


def count(run: bool = False) -> dict:
    """`{"features": {file: feature}, "files": {file: {kind: n}}, "total": {kind: n}, "passed": {kind: n} or None}`."""
    import pytest

    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    recorder = _Recorder()
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_hostile_*.py"))
    args = ["-q", "-p", "no:cacheprovider", *files] + ([] if run else ["--collect-only"])
    with contextlib.redirect_stdout(sys.stderr):  # pytest's own report; stdout keeps only the counts
        code = pytest.main(args, plugins=[recorder])
    if code not in (0, 1) or not recorder.kinds:  # 1: some test failed, which the counts show
        raise SystemExit(f"pytest could not collect the hostile tests (exit code {code}).")
    per_file: dict[str, Counter] = {}
    for file, kind in recorder.kinds.values():
        per_file.setdefault(file, Counter())[kind] += 1
    total = sum(per_file.values(), Counter())
    passed = Counter(kind for nodeid, (_, kind) in recorder.kinds.items() if nodeid in recorder.passed)
    return {
        "features": {file: FEATURES.get(file, file) for file in per_file},
        "files": {file: dict(counts) for file, counts in per_file.items()},
        "total": dict(total),
        "passed": dict(passed) if run else None,
    }


def table(counts: dict) -> str:
    kinds = ("clear error", "correct result")
    lines = ["| feature | file | cases | clear error | correct result |", "| --- | --- | --- | --- | --- |"]
    for file, c in counts["files"].items():
        feature = FEATURES.get(file, file)
        lines.append(f"| {feature} | {file} | {sum(c.values())} | {c.get(kinds[0], 0)} | {c.get(kinds[1], 0)} |")
    total = counts["total"]
    lines.append(f"| all | | {sum(total.values())} | {total.get(kinds[0], 0)} | {total.get(kinds[1], 0)} |")
    if counts["passed"] is not None:
        passed = counts["passed"]
        lines.append(f"| passed | | {sum(passed.values())} | {passed.get(kinds[0], 0)} | {passed.get(kinds[1], 0)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="run the cases too, and count those that pass")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON instead of a table")
    options = parser.parse_args(argv)
    counts = count(run=options.run)
    print(json.dumps(counts) if options.json else table(counts))


if __name__ == "__main__":
    main()
