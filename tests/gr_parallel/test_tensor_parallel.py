"""Tensor-parallel HSTU (Megatron-Core column/row-parallel layers, heads split over the TP group) on gloo ranks equals
the single-device gr-models encoder: forward, input and parameter gradients (gathered to full shapes), a few SGD and
AdamW steps, over hypothesis-drawn shapes with rab on and off; replicated gradients agree across TP ranks; the dense
state dict gathers to and loads from single-device names and shapes. Also the head split itself (HeadShard) and the
one-process (tp=1) conversion."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gr_parallel
from gr_parallel.tensor_parallel import HeadShard, full_dense_state_dict, tensor_parallel_hstu
from tests.gr_dynemb.test_sharding_workers import spawn
from tests.gr_parallel.tp_workers import (
    encoder_config,
    encoder_inputs,
    make_encoder,
    run_encoder,
    worker_tensor_parallel,
)


@pytest.mark.parametrize(
    ("world", "tp", "examples", "tp_only_checks"), [(2, 2, 8, True), (4, 2, 3, False)], ids=["tp2", "tp2-dp2"]
)
def test_tensor_parallel_encoder_equals_single_device(
    world: int, tp: int, examples: int, tp_only_checks: bool, tmp_path: Path
) -> None:
    spawn(world, worker_tensor_parallel, tmp_path, tp, examples, tp_only_checks)


@settings(max_examples=50, deadline=None)
@given(
    parts=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    tp=st.sampled_from([1, 2, 4]),
    dim=st.integers(0, 1),
    other=st.integers(1, 3),
)
def test_head_shard_splits_each_part_and_reassembles(parts: list[int], tp: int, dim: int, other: int) -> None:
    sizes = tuple(p * tp for p in parts)
    layout = HeadShard(dim, sizes)
    shape = [other, other]
    shape[dim] = sum(sizes)
    full = torch.arange(float(torch.Size(shape).numel())).reshape(shape)
    shards = [layout.shard(full, r, tp) for r in range(tp)]
    assert layout.unshard(shards).equal(full)
    # Rank r holds the r-th 1/tp slice of every part, in part order.
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    for r, shard in enumerate(shards):
        idx = torch.cat([torch.arange(s + r * p, s + (r + 1) * p) for s, p in zip(starts, parts, strict=True)])
        assert shard.equal(full.index_select(dim, idx))
    with pytest.raises(ValueError, match="expected size"):
        layout.shard(full.narrow(dim, 0, sum(sizes) - 1), 0, tp)


def test_one_rank_conversion_is_the_single_device_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = gr_parallel.initialize(backend="gloo")
    try:
        config = encoder_config(heads=2, qk=3, v=4, dim=8, blocks=2, use_rab=True)
        ref = make_encoder(config, 0)
        tp_enc = tensor_parallel_hstu(copy.deepcopy(ref), ctx)
        inp = encoder_inputs([3, 6], 8, 1)
        torch.testing.assert_close(run_encoder(tp_enc, inp)[0], run_encoder(ref, inp)[0], atol=1e-6, rtol=0)
        full = full_dense_state_dict(tp_enc, ctx)
        assert {k: v.shape for k, v in full.items()} == {k: v.shape for k, v in ref.state_dict().items()}
    finally:
        gr_parallel.destroy()


def _gpus(n: int) -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= n and torch.distributed.is_nccl_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _gpus(2), reason="needs 2 CUDA GPUs and NCCL")
def test_nccl_tensor_parallel_encoder_equals_single_device(tmp_path: Path) -> None:
    """The same checks over NCCL, each rank on its GPU (fp32 parity with the reference attention; the bf16 autocast
    check runs the default backend's kernels)."""
    spawn(2, worker_tensor_parallel, tmp_path, 2, 4, True, "reference", backend="nccl")


@pytest.mark.gpu
@pytest.mark.skipif(not _gpus(4), reason="needs 4 CUDA GPUs and NCCL")
def test_nccl_tp2_dp2(tmp_path: Path) -> None:
    spawn(4, worker_tensor_parallel, tmp_path, 2, 2, False, "reference", backend="nccl")
