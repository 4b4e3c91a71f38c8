"""The monorepo's packaging contract: src layout, py.typed, ranges (not pins), and the dependency direction."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {
    "gr-kernels": "gr_kernels",
    "gr-dynemb": "gr_dynemb",
    "gr-models": "gr_models",
    "gr-parallel": "gr_parallel",
}
# Allowed first-party edges: gr-kernels <- gr-models <- gr-parallel -> gr-dynemb.
ALLOWED = {
    "gr-kernels": set(),
    "gr-dynemb": set(),
    "gr-models": {"gr-kernels"},
    "gr-parallel": {"gr-models", "gr-dynemb"},
}


def _pyproject(name: str) -> dict:
    return tomllib.loads((REPO / "packages" / name / "pyproject.toml").read_text())


@pytest.mark.parametrize("name", sorted(PACKAGES))
def test_layout_and_metadata(name: str) -> None:
    meta = _pyproject(name)["project"]
    assert meta["name"] == name
    src = REPO / "packages" / name / "src" / PACKAGES[name]
    assert (src / "__init__.py").is_file() and (src / "py.typed").is_file()
    assert re.search(r'^__version__ = "\d+\.\d+\.\d+"$', (src / "__init__.py").read_text(), re.M)
    assert (REPO / "tests" / PACKAGES[name]).is_dir()


@pytest.mark.parametrize("name", sorted(PACKAGES))
def test_dependencies_are_ranges_and_follow_the_architecture(name: str) -> None:
    reqs = [Requirement(r) for r in _pyproject(name)["project"]["dependencies"]]
    for req in reqs:
        assert all(spec.operator not in ("==", "===") for spec in req.specifier), f"{name} pins {req}"
        assert not req.url, f"{name} depends on a URL: {req}"
    first_party = {r.name for r in reqs if r.name in PACKAGES}
    assert first_party <= ALLOWED[name], f"{name} may depend on {ALLOWED[name] or 'no first-party package'}"
    if name == "gr-kernels":
        assert {r.name for r in reqs} == {"torch"}, "gr-kernels depends on torch only"


def test_examples_are_not_a_dependency() -> None:
    for name in PACKAGES:
        src = REPO / "packages" / name / "src"
        for py in src.rglob("*.py"):
            assert not re.search(r"^\s*(from|import) examples\b", py.read_text(), re.M), f"{py} imports examples"
