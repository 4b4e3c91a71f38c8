"""Rank workers of the gr_parallel context and tensor-parallel tests (no tests here: test_context.py and
test_tensor_parallel.py spawn them). Workers live in an importable module because spawned ranks unpickle them by
module name. ``spawn`` (gr_dynemb's helper) initialises gloo over a file store before calling a worker; the torchrun
worker instead sets torchrun's environment and lets ``gr_parallel.initialize`` create the process group."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import gr_parallel
from gr_parallel.context import ParallelConfig

# ----------------------------------------------------------------------------------------------------------------
# context


def check_layout(ctx: gr_parallel.ParallelContext, rank: int, world: int, tp: int) -> None:
    """Megatron's order: TP groups are consecutive ranks, DP groups strided by tp; both groups really talk."""
    assert (ctx.rank, ctx.world_size, ctx.tp_size, ctx.dp_size) == (rank, world, tp, world // tp)
    assert (ctx.tp_rank, ctx.dp_rank) == (rank % tp, rank // tp)
    assert ctx.tp_ranks == list(range(rank // tp * tp, rank // tp * tp + tp))
    assert ctx.dp_ranks == list(range(rank % tp, world, tp))
    assert dist.get_process_group_ranks(ctx.tp_group) == ctx.tp_ranks
    assert dist.get_process_group_ranks(ctx.dp_group) == ctx.dp_ranks
    assert ctx.device == torch.device("cpu") and ctx.backend == "gloo"
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=ctx.tp_group)
    assert t.item() == sum(ctx.tp_ranks)
    d = torch.tensor([float(rank) ** 2])
    dist.all_reduce(d, group=ctx.dp_group)
    assert d.item() == sum(r * r for r in ctx.dp_ranks)

    from megatron.core import parallel_state

    assert parallel_state.get_tensor_model_parallel_world_size() == tp
    assert parallel_state.get_tensor_model_parallel_rank() == rank % tp
    assert parallel_state.get_data_parallel_world_size() == world // tp
    assert parallel_state.get_data_parallel_rank() == rank // tp
    assert parallel_state.get_tensor_model_parallel_group() is ctx.tp_group


def worker_context(rank: int, world: int, tmp: Path) -> None:
    """Every valid tp of this world in turn (so destroy + re-initialise is exercised), then the errors."""
    with pytest.raises(RuntimeError, match="not initialised"):
        gr_parallel.get_context()
    for tp in (t for t in (1, 2, 4) if world % t == 0):
        ctx = gr_parallel.initialize(tp=tp)
        check_layout(ctx, rank, world, tp)
        assert gr_parallel.get_context() is ctx
        # The same config again (as an object or by keyword, backend named or not) is the same context.
        assert gr_parallel.initialize(ParallelConfig(tp=tp)) is ctx
        assert gr_parallel.initialize(tp=tp, backend="gloo") is ctx
        with pytest.raises(RuntimeError, match="already initialised"):
            gr_parallel.initialize(tp=world // tp if world // tp != tp else tp * 2)
        with pytest.raises(RuntimeError, match="already initialised"):
            gr_parallel.initialize(tp=tp, timeout_s=17.0)
        gr_parallel.destroy()
        with pytest.raises(RuntimeError, match="not initialised"):
            gr_parallel.get_context()
        from megatron.core import parallel_state

        assert not parallel_state.model_parallel_is_initialized()
        assert dist.is_initialized()  # the caller's process group stays
    with pytest.raises(ValueError, match="does not divide the world size"):
        gr_parallel.initialize(tp=3)
    with pytest.raises(ValueError, match="already initialised with 'gloo'"):
        gr_parallel.initialize(tp=1, backend="nccl")
    assert not gr_parallel.context.is_initialized()
    gr_parallel.destroy()  # a no-op when nothing is initialised
    # Still usable after the errors.
    check_layout(gr_parallel.initialize(tp=world), rank, world, world)
    gr_parallel.destroy()


def worker_torchrun_env(rank: int, world: int, port: int) -> None:
    """torchrun's environment, no process group yet: initialize creates it, destroy removes it."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    ctx = gr_parallel.initialize(tp=2, backend="gloo", timeout_s=60.0)
    assert dist.is_initialized()
    check_layout(ctx, rank, world, 2)
    gr_parallel.destroy()
    assert not dist.is_initialized()
