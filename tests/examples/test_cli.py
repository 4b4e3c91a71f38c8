"""The shared CLI of the example trainers: a bad config exits 2 with a clear message before the heavy trainer
module is imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from examples.{name}.__main__ import main
rc = main(["--set", "train.lr=-1"])
print(rc, "examples.{name}.trainer" in sys.modules)
"""


@pytest.mark.parametrize("name", ["retrieval", "ranking"])
def test_bad_config_exits_2_without_importing_the_trainer(name: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(name=name)], capture_output=True, text=True, check=False, timeout=120
    )
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert "error: config.train: train.lr must be > 0, got -1.0" in done.stderr
