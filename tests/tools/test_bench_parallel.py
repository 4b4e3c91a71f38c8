"""tools/bench_parallel.py's data path without launching ranks: the global batch is the same wherever it is drawn,
the DP split gives every rank its share (equal counts, every token once, the balancer evening the FLOPs), the FLOP
model is the documented formula, and the markdown reads records from before the DP split existed."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.tools.tool_loader import load_tool

bench = load_tool("bench_parallel")
DIMS = (8, 512, 4, 128, 128)  # blocks, dim, heads, dqk, dv: the benchmark's default model


def rank_imbalance(lengths: list[int], parts: list[list[int]]) -> float:
    costs = [bench.hstu_flops([lengths[i] for i in p], *DIMS) for p in parts]
    return max(costs) / (sum(costs) / len(costs))


def test_hstu_flops_is_the_documented_formula() -> None:
    lengths = [1, 7, 4096]
    blocks, d, h, dqk, dv = DIMS
    proj = sum(lengths) * (2 * d * 2 * h * (dqk + dv) + 2 * h * dv * d)
    attn = sum(2 * h * dqk * n * n for n in lengths)
    assert bench.hstu_flops(lengths, *DIMS) == pytest.approx(blocks * (3 * proj + 3.5 * attn), rel=1e-12)


def test_global_batch_is_a_function_of_its_index() -> None:
    a, b = bench.draw_global_batch(3, 16, 64, 1000), bench.draw_global_batch(3, 16, 64, 1000)
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.items, b.items) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.lengths, bench.draw_global_batch(4, 16, 64, 1000).lengths)
    assert int(a.lengths.min()) >= 1 and int(a.lengths.max()) <= 64 and a.items.numel() == int(a.lengths.sum())


@settings(max_examples=25, deadline=None)
@given(index=st.integers(0, 10_000), seqs_per_rank=st.integers(1, 6), dp=st.integers(1, 4))
def test_dp_split_covers_every_token_once(index: int, seqs_per_rank: int, dp: int) -> None:
    gb = bench.draw_global_batch(index, seqs_per_rank * dp, 50, 1000)
    lengths = gb.lengths.tolist()
    starts = [0, *torch.cumsum(gb.lengths, 0).tolist()]
    for balance in bench.BALANCE_MODES:
        parts = bench.dp_partition(lengths, dp, balance, 4.0)
        assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
        assert [len(p) for p in parts] == [seqs_per_rank] * dp
        for part in parts:
            batch = bench.rank_batch(gb, part)
            want = torch.cat([gb.items[starts[i] : starts[i + 1]] for i in part])
            assert torch.equal(batch.features.values(), want)
            assert torch.equal(batch.target_items, torch.cat([gb.targets[starts[i] : starts[i + 1]] for i in part]))
            assert batch.seq_offsets.tolist() == [0, *torch.cumsum(gb.lengths[part], 0).tolist()]


def test_balancing_evens_the_ranks_flops() -> None:
    """On the benchmark's DP=2 draw (32 sequences per rank, U[1, 4096]) the balanced split is within 1% of even on
    every batch and far better than the contiguous split on average."""
    _, per_square = bench.hstu_flop_coefs(*DIMS)
    coef = bench.hstu_flop_coefs(*DIMS)[0] / per_square
    balanced, contiguous = [], []
    for index in range(8):
        lengths = bench.draw_global_batch(index, 64, 4096, 10).lengths.tolist()
        balanced.append(rank_imbalance(lengths, bench.dp_partition(lengths, 2, "flops", coef)))
        contiguous.append(rank_imbalance(lengths, bench.dp_partition(lengths, 2, "none", coef)))
    assert max(balanced) < 1.01, balanced
    assert sum(contiguous) / 8 > sum(balanced) / 8 + 0.02, (contiguous, balanced)


def test_dp_split_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="balance must be one of"):
        bench.dp_partition([1, 2], 2, "random", 0.0)


def test_markdown_shows_the_split_and_reads_old_records() -> None:
    common = {"device": "X", "tp": 1, "step_ms": 1.0, "tokens_per_s": 10.0, "tflops_per_gpu": 1.0, "mfu": 0.01}
    old = {**common, "gpus": 2, "dp": 2, "scaling_efficiency": 0.84}
    new = {**common, "gpus": 2, "dp": 2, "balance": "flops", "dp_cost_imbalance": 1.0012, "scaling_efficiency": 0.95}
    run = {"device": "X", "command": "c", "machine": "m", "torch": "t", "date": "d", "model": "m"}
    md = bench.markdown([run], [old, new])
    assert "| own draw per rank | - |" in md
    assert "| balanced (FLOPs) | 1.001 |" in md


def test_profiled_kernel_time_counts_device_events_once() -> None:
    """Device time of the profiled steps as the profiler table's total: kernel/copy rows only (CPU ops, which carry
    their kernels' time too, and user-annotation ranges left out), over the batches the profiled steps ran."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def row(device_type, us: float, annotation: bool = False) -> SimpleNamespace:
        return SimpleNamespace(device_type=device_type, self_device_time_total=us, is_user_annotation=annotation)

    table = [
        row(DeviceType.CUDA, 3000.0),  # a kernel
        row(DeviceType.CUDA, 1000.0),  # a copy
        row(DeviceType.CPU, 3000.0),  # the op that launched the kernel
        row(DeviceType.CUDA, 5000.0, annotation=True),  # an op range on the GPU timeline
    ]
    pool = [SimpleNamespace(flops=f) for f in (1e12, 2e12, 3e12)]
    args = SimpleNamespace(warmup=1, steps=2, profile_steps=2)
    # Profiled steps: indices 1 + 2 + PROFILE_LEAD_IN (= 5) and 6, i.e. pool entries 2 and 0.
    assert bench.PROFILE_LEAD_IN == 2
    got = bench.profiled_kernel_time(table, pool, args, gpus=2)
    assert got == {"profiled_kernel_ms": 2.0, "profiled_kernel_tflops_per_gpu": round(4e12 / 4e-3 / 2 / 1e12, 2)}
    assert bench.profiled_kernel_time([], pool, args, gpus=1)["profiled_kernel_tflops_per_gpu"] is None
