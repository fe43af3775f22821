"""What pyproject.toml promises: every runtime import is declared, the sdist and the wheel build with the build
requirement it names and carry the LICENSE, and the installed set is the lock `make test` installs."""

import ast
import importlib.metadata
import subprocess
import sys
import tarfile
import tomllib
import zipfile

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.recipe_assets import REPO

with open(REPO / "pyproject.toml", "rb") as f:
    PYPROJECT = tomllib.load(f)


def _imported_top_level_modules(folder) -> tuple[set[str], set[str]]:
    """(modules imported when the package is imported, modules imported only inside functions)."""
    at_import, deferred = set(), set()
    for path in folder.rglob("*.py"):
        tree = ast.parse(path.read_text())
        in_functions = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            for inner in ast.walk(node)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = {node.module.split(".")[0]}
            else:
                continue
            (deferred if id(node) in in_functions else at_import).update(names)
    return at_import, deferred - at_import


def _distributions(requirements) -> set[str]:
    return {canonicalize_name(Requirement(req).name) for req in requirements}


def test_every_runtime_import_is_a_declared_dependency():
    # An import at module level needs a core dependency; one inside a function (an optional feature) may come from an
    # extra.
    project = PYPROJECT["project"]
    core = _distributions(project["dependencies"])
    extras = _distributions(req for reqs in project["optional-dependencies"].values() for req in reqs)
    distributions = importlib.metadata.packages_distributions()
    at_import, deferred = _imported_top_level_modules(REPO / "trl_qhead")
    missing = {}
    for modules, declared in ((at_import, core), (deferred, core | extras)):
        for module in modules - set(sys.stdlib_module_names) - {"trl_qhead", "__future__"}:
            owners = {canonicalize_name(name) for name in distributions.get(module, [module])}
            if not owners & declared:
                missing[module] = sorted(owners)
    assert not missing, f"imported by trl_qhead but not declared in pyproject.toml: {missing}"


def _build(tmp_path, *hooks: str) -> list:
    """Build from the files git tracks (what a clone has) with setuptools' PEP 517 `hooks` (one process each:
    setuptools keeps state between two hooks), in this environment (the lock's setuptools); the built files' paths."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    tree = tmp_path / "tree"
    for name in filter(None, tracked.split("\0")):
        if (REPO / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / name).write_bytes((REPO / name).read_bytes())
    out, built = tmp_path / "dist", []
    for hook in hooks:
        build = f"import sys; from setuptools import build_meta; print('BUILT', build_meta.{hook}(sys.argv[1]))"
        done = subprocess.run([sys.executable, "-c", build, str(out)], cwd=tree, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Package would be ignored" not in done.stderr
        built.append(out / done.stdout.split("BUILT")[-1].strip())
    return built


def test_sdist_and_wheel_build_and_ship_the_license(tmp_path):
    # The build requirement must admit the setuptools the lock installs (the one that builds here).
    requires = [Requirement(req) for req in PYPROJECT["build-system"]["requires"]]
    setuptools_version = importlib.metadata.version("setuptools")
    assert all(req.specifier.contains(setuptools_version) for req in requires if req.name == "setuptools")
    sdist_path, wheel_path = _build(tmp_path, "build_sdist", "build_wheel")
    with tarfile.open(sdist_path) as sdist:
        names = sdist.getnames()
    assert f"{sdist_path.name.removesuffix('.tar.gz')}/LICENSE" in names
    with zipfile.ZipFile(wheel_path) as wheel:
        names = wheel.namelist()
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        text = wheel.read(metadata).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert "License-Expression: Apache-2.0" in text
    requires_dist = {canonicalize_name(Requirement(line.split(":", 1)[1]).name) for line in text.splitlines() if
                     line.startswith("Requires-Dist:") and "extra ==" not in line}  # fmt: skip
    assert {"tqdm", "psutil", "torch", "transformers", "trl"} <= requires_dist


def test_the_lock_pins_every_dependency_exactly():
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            assert len(requirement.specifier) == 1 and next(iter(requirement.specifier)).operator == "==", line
            pins[canonicalize_name(requirement.name)] = requirement
    project = PYPROJECT["project"]
    wanted = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    for requirement in map(Requirement, wanted):
        pinned = pins.get(canonicalize_name(requirement.name))
        assert pinned is not None, f"{requirement.name} is not in constraints.txt: rerun `make lock`"
        version = next(iter(pinned.specifier)).version
        assert requirement.specifier.contains(version, prereleases=True), (str(requirement), version)


def test_wheel_ships_the_recipes_and_the_command(tmp_path):
    (wheel_path,) = _build(tmp_path, "build_wheel")
    with zipfile.ZipFile(wheel_path) as wheel:
        names = set(wheel.namelist())
        entry_points = wheel.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "trl-qhead = trl_qhead.cli:main" in entry_points
    for name in (
        "cli.py",
        "recipes/qhead_lora.py",
        "recipes/launch.py",
        "recipes/demo_sentiment.py",
        "recipes/offline_assets.py",
        "recipes/configs/qhead_lora.yaml",
        "recipes/configs/accelerate/fsdp.yaml",
        "recipes/data/review_openings.txt",
    ):
        assert f"trl_qhead/{name}" in names, name
    assert not any(n.startswith(("recipes/", "tests/")) for n in names)  # no top-level `recipes` or `tests` package
