"""Shared fixtures: repository paths, the real MovieLens-100K folder, and an installed-package checker."""

from __future__ import annotations

import importlib
import importlib.metadata as md
from collections.abc import Callable
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
ML100K_DIR = REPO.parent / "shared" / "data" / "ml-100k"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    if not (ML100K_DIR / "u.data").is_file():
        pytest.skip(f"MovieLens-100K not found at {ML100K_DIR}")
    return ML100K_DIR


@pytest.fixture
def check_installed() -> Callable[[str, str], None]:
    """Asserts a distribution is installed with its version, py.typed and every declared requirement satisfied."""

    def check(dist_name: str, import_name: str) -> None:
        dist = md.distribution(dist_name)
        module = importlib.import_module(import_name)
        assert module.__version__ == dist.version
        assert (Path(module.__file__).parent / "py.typed").is_file(), f"{import_name} ships no py.typed"
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                installed = md.version(req.name)
            except md.PackageNotFoundError:
                if req.name == "fbgemm-gpu" and _has("fbgemm-gpu-cpu"):
                    continue  # CPU machines carry fbgemm-gpu-cpu, the same ops under another distribution name
                raise AssertionError(f"{dist_name} requires {req} but {req.name} is not installed") from None
            assert req.specifier.contains(installed, prereleases=True), f"{dist_name}: {req} vs installed {installed}"

    return check


def _has(dist_name: str) -> bool:
    try:
        md.version(dist_name)
    except md.PackageNotFoundError:
        return False
    return True
