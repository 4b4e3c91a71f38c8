"""CUDA-graph replay of the HSTU encoder's training step (gr_models.modules.encoder_graphs).

- CPU: the buckets (bounds, idempotence, enough padding sequences for every batch of a bucket); the padded batch the
  graphs run gives the unpadded batch's outputs and gradients (the staging code itself, eagerly); config checks; the
  graphs' state is dropped by copies.
- GPU (``-m gpu``): graphed training steps against eager ones over several buckets (fp32 and bf16 autocast), a
  forward while another's backward is pending, a second backward, moved parameters, the bucket limit.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gr_models.modules import encoder_graphs as eg
from gr_models.modules.hstu import HSTUConfig, HSTUEncoder

CONFIG = HSTUConfig(
    embedding_dim=16,
    num_blocks=2,
    num_heads=2,
    max_seq_len=24,
    dropout=0.0,
    attention_backend="reference",
)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 1 << 22))
def test_bucket_bounds_idempotence_and_padding_capacity(rows: int) -> None:
    padded = eg.bucket_rows(rows)
    assert rows <= padded <= rows + max(eg.MIN_ROW_GRANULE, rows // eg.ROWS_PER_OCTAVE)
    assert eg.bucket_rows(padded) == padded
    for pad_len in (1, 7, eg.PAD_SEQ_LEN):
        ends = eg.padding_offsets(rows, padded, pad_len)
        assert len(ends) == eg.padding_seqs(padded, pad_len)
        assert ends[-1] == padded  # the padding sequences cover every padded row
        starts = [rows, *ends[:-1]]
        assert all(0 <= e - s <= pad_len for s, e in zip(starts, ends, strict=True))


def test_bucket_rows_rejects_an_empty_batch() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        eg.bucket_rows(0)


def test_bucket_len_rounds_up_within_the_limit() -> None:
    assert eg.bucket_len(100, 4096) == 256
    assert eg.bucket_len(100, 200) == 200
    assert eg.bucket_len(300, 200) == 300  # never below the batch's own


def _batch(lengths: list[int], dim: int, seed: int, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    total = int(offsets[-1])
    x = torch.randn(total, dim, generator=g, dtype=dtype)
    ts = torch.randint(0, 10_000, (total,), generator=g).sort().values
    qts = ts + torch.randint(0, 100, (total,), generator=g)
    return [t.to(device) for t in (x, offsets, ts, qts)]


def _grads(encoder: HSTUEncoder, y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in encoder.parameters() if p.requires_grad]
    return list(torch.autograd.grad((y * weight).sum(), [x, *params]))


@pytest.mark.parametrize("use_rab", [False, True])
@pytest.mark.parametrize("extras", [False, True])
def test_padded_batch_gives_the_unpadded_outputs_and_gradients(use_rab: bool, extras: bool) -> None:
    """What a graph runs, run eagerly on CPU: the batch staged into the static buffers with padding sequences."""
    torch.manual_seed(0)
    encoder = HSTUEncoder(dataclasses.replace(CONFIG, use_rab=use_rab))
    lengths = [5, 0, 1, 17, 9]
    x, offsets, ts, qts = _batch(lengths, 16, seed=1)
    num_targets = torch.tensor([2, 0, 1, 3, 1]) if extras else None
    positions = (torch.arange(x.shape[0]) % 7) if extras else None
    contextual = 2 if extras else 0
    max_len = max(lengths)
    kwargs = {"num_targets": num_targets, "contextual_seq_len": contextual, "positions": positions}

    x_leaf = x.clone().requires_grad_(True)
    ref = encoder.encode(x_leaf, offsets, max_len, ts, qts, **kwargs)
    weight = torch.randn_like(ref)
    ref_grads = _grads(encoder, ref, x_leaf, weight)

    rows = x.shape[0]
    padded = eg.bucket_rows(rows)
    n = eg.bucket_len(max_len, CONFIG.max_seq_len)
    pad_len = min(eg.PAD_SEQ_LEN, n)
    key = eg._Key(
        rows=padded, num_seqs=len(lengths), pad_seqs=eg.padding_seqs(padded, pad_len), pad_len=pad_len,
        max_seq_len=n, dim=16, dtype=x.dtype, offsets_dtype=offsets.dtype, contextual_seq_len=contextual,
        has_targets=extras, has_positions=extras, autocast=(False, torch.bfloat16), requires_grad=(),
    )  # fmt: skip
    graphs = eg.EncoderGraphs()
    graphs.io = eg._StaticIO(padded + 3, key.num_seqs + key.pad_seqs + 2, 16, x.dtype, offsets.dtype, "cpu")
    graphs.io.x.fill_(float("nan"))  # stale rows of an earlier batch: the padding must not read them unzeroed
    graphs._stage(graphs.io, key, x, offsets, ts, qts, num_targets, positions, rows)
    x_pad = graphs.io.x[:padded].detach().requires_grad_(True)
    out = encoder.encode(x_pad, validate=True, **graphs._inputs(key))
    torch.testing.assert_close(out[:rows], ref, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(out).all()
    weight_pad = torch.cat([weight, torch.zeros(padded - rows, 16)])
    got = _grads(encoder, out, x_pad, weight_pad)
    torch.testing.assert_close(got[0][:rows], ref_grads[0], rtol=1e-5, atol=1e-6)
    assert not got[0][rows:].any()
    for a, r in zip(got[1:], ref_grads[1:], strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


def test_cuda_graphs_refuse_attention_dropout() -> None:
    with pytest.raises(ValueError, match="attn_dropout == 0"):
        dataclasses.replace(CONFIG, cuda_graphs=True, attn_dropout=0.1)
    with pytest.raises(ValueError, match="cuda_graph_buckets"):
        dataclasses.replace(CONFIG, cuda_graphs=True, cuda_graph_buckets=0)


def test_cpu_calls_run_eagerly_and_copies_start_without_graphs() -> None:
    torch.manual_seed(0)
    encoder = HSTUEncoder(dataclasses.replace(CONFIG, cuda_graphs=True))
    x, offsets, ts, qts = _batch([3, 4], 16, seed=2)
    y = encoder(x, offsets, 4, ts, qts)
    torch.testing.assert_close(y, encoder.encode(x, offsets, 4, ts, qts))
    graphs = encoder._graphs()
    assert graphs is not None and graphs.eager_reason(encoder, x) == "cpu" and graphs.captures == 0
    assert graphs.eager_reason(encoder, x[:0]) == "empty"  # an empty batch runs eagerly on any device
    graphs.captures = 5
    for clone in (copy.deepcopy(encoder), pickle.loads(pickle.dumps(encoder))):
        fresh = clone._graphs()
        assert fresh is not graphs and fresh.captures == 0 and fresh.graphs.limit == CONFIG.cuda_graph_buckets


# ---------------------------------------------------------------------------------------------------------- GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GPU_CONFIG = HSTUConfig(embedding_dim=64, num_blocks=2, num_heads=2, max_seq_len=512, dropout=0.0, use_rab=True)


def _pair(**changes) -> tuple[HSTUEncoder, HSTUEncoder]:
    torch.manual_seed(0)
    eager = HSTUEncoder(dataclasses.replace(GPU_CONFIG, **changes)).cuda()
    graphed = copy.deepcopy(eager)
    graphed.config = dataclasses.replace(graphed.config, cuda_graphs=True)
    return eager, graphed


def _step(encoder: HSTUEncoder, batch, weight, autocast: bool):
    x, offsets, ts, qts = batch
    x = x.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y = encoder(x, offsets, int((offsets[1:] - offsets[:-1]).max()), ts, qts)
    (y.float() * weight).sum().backward()
    grads = [x.grad, *(p.grad.clone() for p in encoder.parameters())]
    encoder.zero_grad(set_to_none=True)
    return y.detach().clone(), grads


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("autocast", [False, True])
def test_graphed_steps_equal_eager_steps_across_buckets(autocast: bool) -> None:
    eager, graphed = _pair()
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-4, "atol": 1e-5}
    torch.backends.cuda.matmul.allow_tf32 = False
    # The largest batch first: growing the static buffers would drop every graph (and recapture).
    for i, lengths in enumerate([[64] * 40, [300, 7, 1, 120], [512, 0, 33], [300, 7, 1, 120], [5, 6]]):
        batch = _batch(lengths, 64, seed=i, device="cuda")
        weight = torch.randn(batch[0].shape[0], 64, device="cuda")
        ref, ref_grads = _step(eager, batch, weight, autocast)
        got, got_grads = _step(graphed, batch, weight, autocast)
        torch.testing.assert_close(got, ref, **tol)
        for a, r in zip(got_grads, ref_grads, strict=True):
            torch.testing.assert_close(a, r, **tol)
    graphs = graphed._graphs()
    assert graphs.captures == 4 and graphs.replays == 5  # the fourth batch replays the second one's bucket
    assert not graphs.io.out.requires_grad  # the capture's autograd graph is not kept alive through the buffer


@pytest.mark.gpu
@needs_cuda
def test_forward_while_a_backward_is_pending_runs_eagerly_and_double_backward_fails() -> None:
    eager, graphed = _pair()
    batches = [_batch(lengths, 64, seed=i, device="cuda") for i, lengths in enumerate([[100, 20], [50, 60, 7]])]
    results = []
    for enc in (eager, graphed):
        xs = [b[0].clone().requires_grad_(True) for b in batches]
        ys = [enc(x, b[1], 100, b[2], b[3]) for x, b in zip(xs, batches, strict=True)]
        sum(y.square().sum() for y in ys).backward()
        results.append([x.grad for x in xs] + [p.grad.clone() for p in enc.parameters()])
        enc.zero_grad(set_to_none=True)
    for a, r in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
    graphs = graphed._graphs()
    assert graphs.replays == 1  # the second forward ran eagerly
    x, offsets, ts, qts = batches[0]
    y = graphed(x.clone().requires_grad_(True), offsets, 100, ts, qts)
    loss = y.square().sum()
    loss.backward(retain_graph=True)
    graphed(x.clone().requires_grad_(True), offsets, 100, ts, qts).sum().backward()
    with pytest.raises(RuntimeError, match="overwritten by a later graphed forward"):
        loss.backward()


@pytest.mark.gpu
@needs_cuda
def test_moved_parameters_recapture_and_the_bucket_limit_holds() -> None:
    eager, graphed = _pair(cuda_graph_buckets=2)
    # The largest bucket first (the static buffers then never grow, which would drop every graph): 2048 rows, 256,
    # 1280 (drops 2048, the least recently used), 2048 again (drops 256).
    for i, lengths in enumerate([[500] * 4, [10], [400] * 3, [500] * 4]):
        batch = _batch(lengths, 64, seed=i, device="cuda")
        weight = torch.randn(batch[0].shape[0], 64, device="cuda")
        ref, _ = _step(eager, batch, weight, False)
        got, _ = _step(graphed, batch, weight, False)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    graphs = graphed._graphs()
    assert len(graphs.graphs) == 2 and graphs.captures == 4
    captures = graphs.captures
    for m in (eager, graphed):  # new parameter storage, same values
        for p in m.parameters():
            p.data = p.data.clone()
    batch = _batch([10], 64, seed=9, device="cuda")
    weight = torch.randn(10, 64, device="cuda")
    ref, _ = _step(eager, batch, weight, False)
    got, _ = _step(graphed, batch, weight, False)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert graphs.captures == captures + 1
