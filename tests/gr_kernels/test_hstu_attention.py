"""Parity of gr_kernels.hstu_attention (outputs and every gradient) with a naive per-sequence loop."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gr_kernels
from gr_kernels import AttentionCall, HSTUAttentionBackend, hstu_attention, hstu_valid_mask


def allowed(i: int, j: int, length: int, targets: int, ctx: int, causal: bool, window: int, group: int) -> bool:
    """The mask rules of gr_kernels.masks, restated one pair at a time."""
    hist = length - targets
    ctx = min(ctx, hist)
    if i >= length or j >= length:
        return False
    if j >= hist:  # target column: same group only (and causal inside it)
        return i >= hist and (i - hist) // group == (j - hist) // group and (j <= i or not causal)
    if j < ctx:  # context column: visible to all
        return True
    if i >= hist:  # target row on a history column: window measured from position `hist`
        return window == 0 or hist - j <= window
    if i < ctx:  # context row: the whole history
        return True
    if causal and j > i:
        return False
    return window == 0 or abs(i - j) <= window


def naive_hstu(q, k, v, lengths, n, *, alpha, scale, causal, window, ctx, num_targets, group, rab):
    """Explicit loops over sequences, heads, queries and keys (differentiable, slow, obviously right)."""
    out = []
    start = 0
    for b, length in enumerate(lengths):
        t = 0 if num_targets is None else int(num_targets[b])
        for i in range(length):
            heads = []
            for h in range(q.shape[1]):
                acc = torch.zeros(v.shape[2], dtype=v.dtype)
                for j in range(length):
                    if not allowed(i, j, length, t, ctx, causal, window, group):
                        continue
                    s = (q[start + i, h] * k[start + j, h]).sum()
                    if rab is not None:
                        s = s + rab[b, h if rab.shape[1] > 1 else 0, i, j]
                    z = alpha * s
                    acc = acc + z * torch.sigmoid(z) / scale * v[start + j, h]
                heads.append(acc)
            out.append(torch.stack(heads))
        start += length
    if not out:
        return v.new_zeros(v.shape)
    return torch.stack(out)


def make_inputs(lengths, heads, dqk, dv, n, *, with_rab, rab_heads, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, heads, dqk, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(total, heads, dqk, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(total, heads, dv, generator=g, dtype=dtype).requires_grad_()
    offsets = torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int64)
    rab = None
    if with_rab:
        rab = torch.randn(len(lengths), rab_heads, n, n, generator=g, dtype=dtype).requires_grad_()
    return q, k, v, offsets, rab


def check_parity(lengths, *, heads=2, dqk=4, dv=3, n=None, alpha=0.7, scaling=None, causal=True, window=0, ctx=0,
                 targets=None, group=1, with_rab=False, rab_heads=1, seed=0):  # fmt: skip
    n = n or max([*lengths, 1])
    q, k, v, offsets, rab = make_inputs(lengths, heads, dqk, dv, n, with_rab=with_rab, rab_heads=rab_heads, seed=seed)
    num_targets = None if targets is None else torch.tensor(targets, dtype=torch.int64)
    kw = dict(alpha=alpha, causal=causal, max_attn_len=window, contextual_seq_len=ctx, num_targets=num_targets,
              target_group_size=group, rab=rab)  # fmt: skip
    got = hstu_attention(q, k, v, offsets, n, scaling_seqlen=scaling, **kw)
    want = naive_hstu(q, k, v, lengths, n, alpha=alpha, scale=scaling or n, causal=causal, window=window, ctx=ctx,
                      num_targets=num_targets, group=group, rab=rab)  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if sum(lengths) == 0:
        return
    grad = torch.randn_like(got)
    inputs = [t for t in (q, k, v, rab) if t is not None]
    got_grads = torch.autograd.grad(got, inputs, grad)
    want_grads = torch.autograd.grad(want, inputs, grad, allow_unused=True)
    names = ("dq", "dk", "dv", "drab")[: len(got_grads)]
    for name, a, b in zip(names, got_grads, want_grads, strict=True):
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


CASES = {
    "causal": dict(),
    "bidirectional": dict(causal=False),
    "window": dict(window=2),
    "window_bidirectional": dict(window=1, causal=False),
    "context": dict(ctx=2),
    "targets": dict(targets=[1, 0, 2, 0, 3]),
    "target_groups": dict(targets=[2, 0, 3, 1, 4], group=2),
    "targets_context_window": dict(targets=[1, 0, 2, 1, 2], ctx=1, window=2),
    "rab_shared": dict(with_rab=True),
    "rab_per_head": dict(with_rab=True, rab_heads=2),
    "rab_targets_context": dict(with_rab=True, targets=[1, 0, 1, 1, 2], ctx=2),
    "scaling_seqlen_and_padding": dict(n=9, scaling=5),
    "attn_dim_ne_hidden": dict(dqk=5, dv=2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_every_mask(case: str) -> None:
    # ragged lengths including 0 and 1
    check_parity([3, 0, 5, 1, 6], **CASES[case])


def test_empty_batch_and_all_empty_sequences() -> None:
    check_parity([0, 0])
    check_parity([], n=4)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    heads=st.integers(1, 2),
    causal=st.booleans(),
    window=st.integers(0, 3),
    ctx=st.integers(0, 3),
    group=st.integers(1, 3),
    use_targets=st.booleans(),
    with_rab=st.booleans(),
    extra_n=st.integers(0, 2),
    seed=st.integers(0, 1000),
)
def test_parity_hypothesis(lengths, heads, causal, window, ctx, group, use_targets, with_rab, extra_n, seed) -> None:
    targets = [seed % (n + 1) for n in lengths] if use_targets else None
    check_parity(lengths, heads=heads, causal=causal, window=window, ctx=ctx, targets=targets, group=group,
                 with_rab=with_rab, rab_heads=heads, n=max([*lengths, 1]) + extra_n, seed=seed)  # fmt: skip


def test_mask_hand_written() -> None:
    # L=5, C=1, two targets with group size 1: rows/cols 0 (context), 1-2 (history), 3-4 (targets).
    mask = hstu_valid_mask(torch.tensor([5]), 6, contextual_seq_len=1, num_targets=torch.tensor([2]))[0].int()
    want = torch.tensor([
        [1, 1, 1, 0, 0, 0],  # context row: whole history, no targets
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],  # target: history + itself
        [1, 1, 1, 0, 1, 0],  # target: history + itself, not the other target
        [0, 0, 0, 0, 0, 0],  # padding
    ])  # fmt: skip
    assert torch.equal(mask, want)
    # group size 2: the two targets form one group and see each other causally
    grouped = hstu_valid_mask(torch.tensor([5]), 5, num_targets=torch.tensor([2]), target_group_size=2)[0].int()
    assert grouped[4].tolist() == [1, 1, 1, 1, 1] and grouped[3].tolist() == [1, 1, 1, 1, 0]
    # local window of 1, causal: each row sees itself and its predecessor
    win = hstu_valid_mask(torch.tensor([4]), 4, max_attn_len=1)[0].int()
    assert win.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]


def test_gradcheck_with_dropout_and_rab() -> None:
    q, k, v, offsets, rab = make_inputs([3, 1, 4], 2, 3, 2, 4, with_rab=True, rab_heads=1, seed=1)

    def fn(q, k, v, rab):
        torch.manual_seed(5)  # same dropout mask on every evaluation
        return hstu_attention(
            q, k, v, offsets, 4, alpha=0.5, rab=rab, dropout_p=0.3, num_targets=torch.tensor([1, 0, 2])
        )

    assert torch.autograd.gradcheck(fn, (q, k, v, rab))


def test_dropout_reproducible_and_off_in_eval() -> None:
    q, k, v, offsets, _ = make_inputs([5, 3], 1, 4, 4, 5, with_rab=False, rab_heads=1, seed=2)
    torch.manual_seed(0)
    a = hstu_attention(q, k, v, offsets, 5, alpha=1.0, dropout_p=0.5)
    torch.manual_seed(0)
    b = hstu_attention(q, k, v, offsets, 5, alpha=1.0, dropout_p=0.5)
    c = hstu_attention(q, k, v, offsets, 5, alpha=1.0, dropout_p=0.5, training=False)
    d = hstu_attention(q, k, v, offsets, 5, alpha=1.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(c, d, rtol=0, atol=0)
    assert not torch.allclose(a, d)


def _op_args(with_rab: bool, with_targets: bool) -> tuple:
    q, k, v, offsets, rab = make_inputs([3, 0, 4], 2, 4, 3, 4, with_rab=with_rab, rab_heads=2, seed=3,
                                        dtype=torch.float32)  # fmt: skip
    targets = torch.tensor([1, 0, 2]) if with_targets else None
    return q, k, v, offsets, 4, 0.5, 4, True, 0, 1, targets, 1, rab, 0.0, 0, "reference"


@pytest.mark.parametrize("with_rab", [False, True])
@pytest.mark.parametrize("with_targets", [False, True])
def test_opcheck(with_rab: bool, with_targets: bool) -> None:
    args = _op_args(with_rab, with_targets)
    torch.library.opcheck(torch.ops.gr_kernels.hstu_attention_fwd, args)
    grad = torch.randn(args[2].shape)
    torch.library.opcheck(torch.ops.gr_kernels.hstu_attention_bwd, (grad, *[a.detach() if torch.is_tensor(a) and
                          a.requires_grad else a for a in args]))  # fmt: skip


def test_torch_compile() -> None:
    q, k, v, offsets, rab = make_inputs([3, 2], 1, 4, 4, 3, with_rab=True, rab_heads=1, seed=4, dtype=torch.float32)

    def fn(q, k, v, rab):
        return hstu_attention(q, k, v, offsets, 3, alpha=0.5, rab=rab, validate=False).sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, rab), fn(q, k, v, rab))
    g1 = torch.autograd.grad(compiled(q, k, v, rab), (q, rab))
    g2 = torch.autograd.grad(fn(q, k, v, rab), (q, rab))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)


def test_bf16_close_to_fp32() -> None:
    q, k, v, offsets, rab = make_inputs([6, 4], 2, 8, 8, 6, with_rab=True, rab_heads=1, seed=5, dtype=torch.float32)
    ref = hstu_attention(q, k, v, offsets, 6, alpha=0.3, rab=rab)
    low = hstu_attention(*(t.bfloat16() for t in (q, k, v)), offsets, 6, alpha=0.3, rab=rab.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.02)


def test_backend_registry(caplog: pytest.LogCaptureFixture) -> None:
    q, k, v, offsets, _ = make_inputs([2, 3], 1, 4, 4, 3, with_rab=False, rab_heads=1, seed=6)
    calls: list[str] = []

    def fwd(*args):
        calls.append("fwd")
        return gr_kernels.reference_forward(*args)

    picky = HSTUAttentionBackend(
        "picky_test", fwd, gr_kernels.reference_backward, lambda c: None if c.dtype == torch.float16 else "fp16 only",
        priority=10,
    )  # fmt: skip
    gr_kernels.register_backend(picky)
    try:
        assert gr_kernels.available_backends()[0] == "picky_test"
        with caplog.at_level(logging.INFO, logger="gr_kernels"):
            hstu_attention(q, k, v, offsets, 3, alpha=1.0)
            hstu_attention(q, k, v, offsets, 3, alpha=1.0)
        skips = [r for r in caplog.records if "picky_test" in r.getMessage()]
        assert len(skips) == 1 and "fp16 only" in skips[0].getMessage()
        assert calls == []  # auto fell back to the reference
        with pytest.raises(ValueError, match="cannot run this call: fp16 only"):
            hstu_attention(q, k, v, offsets, 3, alpha=1.0, backend="picky_test")
        with pytest.raises(ValueError, match="already registered"):
            gr_kernels.register_backend(picky)
        out = hstu_attention(q.half(), k.half(), v.half(), offsets, 3, alpha=1.0)
        assert calls == ["fwd"] and out.dtype == torch.float16
    finally:
        gr_kernels.unregister_backend("picky_test")
    with pytest.raises(ValueError, match=r"unknown hstu_attention backend 'nope'; registered: \['reference'\]"):
        hstu_attention(q, k, v, offsets, 3, alpha=1.0, backend="nope")
    assert isinstance(AttentionCall, type)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(seq_offsets=torch.tensor([0, 2, 4])), "end at total_tokens=5"),
        (dict(seq_offsets=torch.tensor([0, 4, 2, 5])), "non-decreasing"),
        (dict(seq_offsets=torch.tensor([0.0, 5.0])), "seq_offsets must be a 1-D int32/int64"),
        (dict(max_seq_len=2), "length 3 > max_seq_len=2"),
        (dict(num_targets=torch.tensor([3])), "num_targets must be an integer tensor"),
        (dict(num_targets=torch.tensor([0, 4])), r"num_targets\[1\]=4 must lie in \[0, length=3\]"),
        (dict(rab=torch.zeros(2, 1, 4, 4)), "rab must be"),
        (dict(k=torch.zeros(5, 1, 3)), "k must have q's shape"),
        (dict(v=torch.zeros(5, 1, 4, dtype=torch.float64)), "share a dtype"),
        (dict(max_attn_len=-1), "max_attn_len must be >= 0"),
        (dict(target_group_size=0), "target_group_size must be >= 1"),
        (dict(dropout_p=1.0), "dropout_p must be in"),
        (dict(alpha=float("nan")), "alpha must be finite"),
    ],
)
def test_validation_errors(change: dict, match: str) -> None:
    args = dict(q=torch.zeros(5, 1, 4), k=torch.zeros(5, 1, 4), v=torch.zeros(5, 1, 4),
                seq_offsets=torch.tensor([0, 2, 5]), max_seq_len=3)  # fmt: skip
    kwargs = dict(alpha=1.0)
    for key, value in change.items():
        (args if key in args else kwargs)[key] = value
    with pytest.raises((ValueError, TypeError), match=match):
        hstu_attention(**args, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_parity_on_cuda() -> None:
    q, k, v, offsets, rab = make_inputs([5, 0, 1, 7], 2, 8, 8, 7, with_rab=True, rab_heads=2, seed=7,
                                        dtype=torch.float32)  # fmt: skip
    targets = torch.tensor([1, 0, 0, 2])
    cpu = hstu_attention(q, k, v, offsets, 7, alpha=0.4, rab=rab, num_targets=targets, contextual_seq_len=1)
    dev = [t.detach().cuda().requires_grad_() for t in (q, k, v, rab)]
    gpu = hstu_attention(dev[0], dev[1], dev[2], offsets.cuda(), 7, alpha=0.4, rab=dev[3], num_targets=targets.cuda(),
                         contextual_seq_len=1)  # fmt: skip
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
