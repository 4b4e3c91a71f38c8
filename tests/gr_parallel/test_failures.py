"""A rank that raises takes the whole job down quickly with its error (no rank left hanging in a collective): under
torchrun (``--max-restarts 0``) a 2-rank training job whose rank 1 raises mid-training while rank 0 waits in the
next step's collectives exits non-zero within a minute, naming rank 1 and its exception; ``gr_parallel.launch
.run_ranks`` (the local launcher of tests and examples) kills the survivors and re-raises the first error, and
kills a job that outlives its timeout."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from gr_parallel.launch import RankFailedError, run_ranks

REPO = Path(__file__).resolve().parents[2]


# Rank workers of run_ranks (spawned ranks import them from here: this module stays light to import).
def rank_raises(fail_rank: int) -> None:
    """``fail_rank`` raises; the others block in an all-reduce it never joins."""
    if dist.get_rank() == fail_rank:
        time.sleep(1.0)
        raise KeyError(f"rank {fail_rank} lost its table at {time.time():.3f}")
    dist.all_reduce(torch.ones(1))


def rank_hangs(hang_rank: int) -> None:
    """``hang_rank`` neither fails nor joins; the others block in an all-reduce."""
    if dist.get_rank() == hang_rank:
        time.sleep(3600)
    dist.all_reduce(torch.ones(1))


def rank_dies(dying_rank: int) -> None:
    """``dying_rank`` exits hard (as if killed) without raising; the others block in an all-reduce."""
    if dist.get_rank() == dying_rank:
        os._exit(3)
    dist.all_reduce(torch.ones(1))


def rank_value(scale: int) -> tuple[int, int]:
    t = torch.tensor([dist.get_rank() + 1])
    dist.all_reduce(t)
    return dist.get_rank() * scale, int(t)


def test_torchrun_job_with_a_failing_rank_exits_with_its_error() -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "0",
    ]
    cmd += ["-m", "tests.gr_parallel.ckpt_workers", "crash", "1", "3"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    exited = time.time()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    raised = float(re.search(r"rank 1 raises at (\d+\.\d{3});", out).group(1))  # type: ignore[union-attr]
    # From the failure to the whole job's exit (start-up, slow on a loaded machine, is not counted).
    assert exited - raised < 30, f"the job exited {exited - raised:.0f} s after rank 1 failed"
    assert "rank 0 finished step 2" in out and "rank 1 finished step 2" in out  # it failed mid-training
    assert "rank 0 finished step 3" not in out
    summary = out[out.index("Root Cause") :]  # torchrun's summary: the first failure, rank and traceback
    assert "rank      : 1 (local_rank: 1)" in summary, summary
    assert "ValueError: rank 1 fails on purpose at step 3" in summary, summary


def test_run_ranks_reraises_the_first_error_and_kills_the_others() -> None:
    with pytest.raises(RankFailedError, match="rank 1 failed: KeyError: 'rank 1 lost its table at ") as info:
        run_ranks(rank_raises, 2, 1, timeout_s=120)
    returned = time.time()
    assert info.value.rank == 1 and "rank_raises" in info.value.remote_traceback
    raised = float(re.search(r"lost its table at (\d+\.\d{3})", str(info.value)).group(1))  # type: ignore[union-attr]
    assert returned - raised < 15, f"run_ranks returned {returned - raised:.0f} s after the failure"


def test_run_ranks_kills_a_job_past_its_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] still running after 20 s"):
        run_ranks(rank_hangs, 2, 1, timeout_s=20, grace_s=2)
    assert time.monotonic() - start < 40


def test_run_ranks_returns_every_rank_result_and_reports_a_dead_rank() -> None:
    assert run_ranks(rank_value, 3, 10, timeout_s=120) == [(0, 6), (10, 6), (20, 6)]
    with pytest.raises(RankFailedError, match="rank 0 failed: exited with code 3 without reporting a result"):
        run_ranks(rank_dies, 2, 0, timeout_s=120)
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        run_ranks(rank_value, 0, 10)
