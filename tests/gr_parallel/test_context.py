"""gr_parallel.initialize: Megatron's process layout (TP groups of consecutive ranks, DP groups strided) on 2 and 4
gloo ranks, collectives over both groups, idempotent and conflicting re-initialisation, destroy, bad sizes, and
initialisation from torchrun's environment or from nothing (a one-process group)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gr_parallel
from gr_parallel import ParallelConfig
from tests.gr_dynemb.test_sharding_workers import spawn
from tests.gr_parallel.tp_workers import worker_context, worker_torchrun_env


@pytest.mark.parametrize(("world", "tps"), [(2, (1,)), (4, (2,))])
def test_layout_collectives_reinitialise_destroy(world: int, tps: tuple[int, ...], tmp_path: Path) -> None:
    """tps, then tp = world: on 2 ranks tp 1 and 2, on 4 ranks tp 2 (2 x 2) and 4."""
    spawn(world, worker_context, tmp_path, tps)


def test_initialize_from_torchrun_environment() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker_torchrun_env, args=(2, port), nprocs=2, join=True)


def test_single_process_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert not dist.is_initialized()
    ctx = gr_parallel.initialize(backend="gloo")
    try:
        assert (ctx.rank, ctx.world_size, ctx.tp_size, ctx.dp_size, ctx.tp_rank, ctx.dp_rank) == (0, 1, 1, 1, 0, 0)
        t = torch.ones(3)
        dist.all_reduce(t, group=ctx.tp_group)
        dist.all_reduce(t, group=ctx.dp_group)
        assert torch.equal(t, torch.ones(3))
        with pytest.raises(ValueError, match="does not divide the world size 1"):
            gr_parallel.destroy()
            gr_parallel.initialize(tp=2, backend="gloo")
        assert not dist.is_initialized()  # the failed initialise removed the group it had made
    finally:
        gr_parallel.destroy()
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tp": 0}, "tp must be a positive int"),
        ({"tp": -2}, "tp must be a positive int"),
        ({"tp": 1.5}, "tp must be a positive int"),
        ({"tp": True}, "tp must be a positive int"),
        ({"backend": "mpi"}, "backend must be one of"),
        ({"timeout_s": 0}, "timeout_s must be positive"),
    ],
)
def test_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ParallelConfig(**kwargs)
    with pytest.raises(ValueError, match=match):
        gr_parallel.initialize(**kwargs)
    assert not dist.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_nccl_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="'nccl' needs CUDA"):
        gr_parallel.initialize(backend="nccl")
    assert not dist.is_initialized()


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.device_count() >= 2 and dist.is_nccl_available()),
    reason="needs 2 CUDA GPUs and NCCL",
)
def test_nccl_layout_collectives_reinitialise_destroy(tmp_path: Path) -> None:
    spawn(2, worker_context, tmp_path, (1,), backend="nccl")
