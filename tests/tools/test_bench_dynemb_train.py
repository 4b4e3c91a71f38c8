"""tools/bench_dynemb_train.py: its power-law workload, and one tiny end-to-end run of all three backends."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tools.tool_loader import load_tool

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "bench_dynemb_train.py"


bench = load_tool("bench_dynemb_train")


def test_power_law_ranks_follow_the_law():
    alpha = 1.05
    ranks = bench.power_law_ranks(400_000, 1000, alpha, torch.Generator().manual_seed(0))
    assert ranks.min() >= 0 and ranks.max() < 1000
    counts = torch.bincount(ranks, minlength=1000).double()
    # P(r) ~ (r+1)^-alpha: the count ratio of rank 0 to rank k is (k+1)^alpha.
    for k in (1, 3, 9):
        assert counts[0] / counts[k] == pytest.approx((k + 1) ** alpha, rel=0.05)


def test_workload_keys_are_a_bijection_of_ranks():
    args = bench.parse_args(["--device", "cpu", "--keys", "3000", "--id-space", "500", "--tables", "3"])
    work = bench.Workload(args)
    ranks, keys = work.rank_batches[0], work.key_batches[0]
    for t in range(3):
        r, k = ranks[t * 1000 : (t + 1) * 1000], keys[t * 1000 : (t + 1) * 1000]
        # the same rank always maps to the same key, different ranks to different keys
        pairs = torch.unique(torch.stack([r, k], 1), dim=0)
        assert torch.unique(pairs[:, 0]).numel() == pairs.shape[0] == torch.unique(pairs[:, 1]).numel()
    assert (keys >= 0).all()


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--optimizer", "adam"])  # FBGEMM's CPU TBE has no Adam
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--dim", "0"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tiny_run_writes_all_three_backends(tmp_path):
    out = tmp_path / "train"
    cmd = [sys.executable, str(TOOL), "--device", "cpu", "--keys", "4000", "--id-space", "5000", "--tables", "2"]
    cmd += ["--dim", "16", "--steps", "2", "--warmup", "1", "--out", str(out)]
    env = {"MASTER_PORT": str(_free_port()), "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, **env}, capture_output=True, timeout=300)
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["backend"] for r in data["records"]] == ["gr_dynemb", "torchrec_static", "torchrec_mch"]
    for r in data["records"]:
        assert r["bench"] == "train_step" and r["device"] == "cpu" and math.isfinite(r["ms"]) and r["ms"] > 0
        assert r["keys"] == 4000 and r["tables"] == 2 and r["optimizer"] == "adagrad"
    assert "| cpu | torchrec_static |" in out.with_suffix(".md").read_text()
    # The plot needs matplotlib (the workspace env has it; the per-package test envs need not): then it is skipped.
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert out.with_suffix(".png").is_file() == has_matplotlib
    if has_matplotlib:
        assert out.with_suffix(".png").stat().st_size > 0
