"""Dense gradient sync, clipping and counts over the TP/DP groups (gloo, spawned ranks; workers in
parity_workers.py), and their argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gr_parallel.context import ParallelConfig, ParallelContext
from gr_parallel.dense import (
    DenseGradSync,
    DenseOptimizerConfig,
    MegatronGradSync,
    clip_grad_norm_,
    global_count,
    grad_buckets,
    grad_norm,
)
from tests.gr_parallel import parity_workers as pw


@pytest.mark.parametrize(("world", "tp"), [(2, 1), (2, 2), (4, 2)])
def test_sync_clip_count_on_layout(tmp_path, world, tp):
    """On DP=2, TP=2 and TP=2 x DP=2: the bucketed sync equals one all-reduce per parameter over the DP group;
    clip_grad_norm_ (L2 and inf) equals torch's on the gathered full model; global_count sums over DP only."""
    pw.spawn(world, pw.worker_dense_units, tmp_path, tp)


def one_rank() -> ParallelContext:
    """A one-rank layout (no collectives are issued when tp = dp = 1)."""
    return ParallelContext(
        rank=0,
        world_size=1,
        tp_size=1,
        dp_size=1,
        tp_rank=0,
        dp_rank=0,
        tp_group=None,  # type: ignore[arg-type]
        dp_group=None,  # type: ignore[arg-type]
        device=torch.device("cpu"),
        backend="gloo",
        config=ParallelConfig(),
        tp_ranks=[0],
        dp_ranks=[0],
    )


def test_single_rank_sync_fills_missing_densifies_sparse_and_leaves_dense_gradients_alone():
    dense, missing, sparse = (nn.Parameter(torch.randn(4, 3)) for _ in range(3))
    dense.grad = torch.randn(4, 3)
    sparse.grad = torch.randn(4, 3).to_sparse()
    before, sparse_values = dense.grad, sparse.grad.to_dense()
    DenseGradSync([dense, missing, sparse], one_rank()).sync()
    assert dense.grad is before  # nothing to sum over one rank: no copy
    assert torch.equal(missing.grad, torch.zeros(4, 3))
    assert not sparse.grad.is_sparse and torch.equal(sparse.grad, sparse_values)


def test_single_rank_clip_equals_torch():
    torch.manual_seed(0)
    a = [nn.Parameter(torch.randn(4, 3)) for _ in range(3)]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b, strict=True):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    want = torch.nn.utils.clip_grad_norm_(a, 0.3)
    got = clip_grad_norm_(b, 0.3, one_rank())
    torch.testing.assert_close(got, want)
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(q.grad, p.grad)


def test_bad_arguments():
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="bucket_mb"):
        DenseGradSync([p], one_rank(), bucket_mb=0)
    with pytest.raises(ValueError, match="listed twice"):
        DenseGradSync([p, p], one_rank())
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_([p], 0.0, one_rank())
    with pytest.raises(ValueError, match="norm_type"):
        grad_norm([p], one_rank(), norm_type=-1)
    with pytest.raises(ValueError, match="scalar count"):
        global_count(torch.ones(3), one_rank())
    with pytest.raises(TypeError, match="int, float or scalar tensor"):
        global_count("7", one_rank())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="Megatron-Core DDP needs CUDA"):
        MegatronGradSync([p], one_rank())
    with pytest.raises(ValueError, match="lr"):
        DenseOptimizerConfig(lr=0)
    with pytest.raises(ValueError, match="betas"):
        DenseOptimizerConfig(betas=(0.9, 1.0))


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=3), min_size=1, max_size=6),
    max_norm=st.floats(0.01, 10.0),
    norm_type=st.sampled_from([1.0, 2.0, 3.0, math.inf]),
    seed=st.integers(0, 1000),
)
def test_clip_equals_torch_any_shapes(shapes, max_norm, norm_type, seed):
    """One rank (no TP shards): the norm and the clipped gradients are torch's, for any shapes and norm type."""
    g = torch.Generator().manual_seed(seed)
    a = [nn.Parameter(torch.zeros(s)) for s in shapes]
    b = [nn.Parameter(torch.zeros(s)) for s in shapes]
    for p, q in zip(a, b, strict=True):
        p.grad = torch.randn(p.shape, generator=g) * 2
        q.grad = p.grad.clone()
    want = torch.nn.utils.clip_grad_norm_(a, max_norm, norm_type=norm_type)
    got = clip_grad_norm_(b, max_norm, one_rank(), norm_type=norm_type)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(1, 40), st.sampled_from([torch.float32, torch.float64])), max_size=12),
    bucket_bytes=st.integers(4, 400),
)
def test_buckets_keep_order_dtype_and_size(sizes, bucket_bytes):
    params = [nn.Parameter(torch.zeros(n, dtype=dt)) for n, dt in sizes]
    buckets = grad_buckets(params, bucket_bytes)
    assert [p for b in buckets for p in b] == params  # every parameter once, in order
    for b in buckets:
        assert len({p.dtype for p in b}) == 1
        nbytes = sum(p.numel() * p.element_size() for p in b)
        assert nbytes <= bucket_bytes or len(b) == 1  # only a parameter larger than a bucket stands alone over it
