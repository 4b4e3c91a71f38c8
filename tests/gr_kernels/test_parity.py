"""Masks and parity (output and every gradient) of hstu_attention with a naive per-sequence, per-head loop."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gr_kernels import hstu_attention, hstu_valid_mask


def visible(i: int, j: int, length: int, targets: int, context: int, causal: bool, window: int, group: int) -> bool:
    """The mask rules, one (query i, key j) pair at a time, written independently of gr_kernels.masks."""
    if i >= length or j >= length:  # padding
        return False
    history = length - targets
    context = min(context, history)
    if j >= history:  # target column: targets of the same group, not after the query
        if i < history:
            return False
        if (i - history) // group != (j - history) // group:
            return False
        return j <= i
    if j < context:  # context column: everyone
        return True
    if i < context:  # context row: the whole history
        return True
    if i >= history:  # target row on history: the target sits at position `history`
        return window == 0 or history - j <= window
    if causal and j > i:
        return False
    return not (window > 0 and abs(i - j) > window)


def naive_mask(lengths: list[int], n: int, targets: list[int] | None, **rules: int | bool) -> torch.Tensor:
    out = torch.zeros(len(lengths), n, n, dtype=torch.bool)
    for b, length in enumerate(lengths):
        t = 0 if targets is None else targets[b]
        for i, j in itertools.product(range(n), range(n)):
            out[b, i, j] = visible(i, j, length, t, **rules)
    return out


def naive_hstu(q, k, v, lengths, *, alpha, scale, causal, window, context, targets, group, rab):
    """Explicit loops over sequences, heads, queries and keys; differentiable, slow and obviously right."""
    rows = []
    start = 0
    for b, length in enumerate(lengths):
        t = 0 if targets is None else targets[b]
        for i in range(length):
            heads = []
            for h in range(q.shape[1]):
                acc = torch.zeros(v.shape[2], dtype=v.dtype, device=v.device)
                for j in range(length):
                    if not visible(i, j, length, t, context, causal, window, group):
                        continue
                    s = torch.dot(q[start + i, h], k[start + j, h])
                    if rab is not None:
                        s = s + rab[b, 0 if rab.shape[1] == 1 else h, i, j]
                    z = alpha * s
                    acc = acc + z * torch.sigmoid(z) / scale * v[start + j, h]
                heads.append(acc)
            rows.append(torch.stack(heads))
        start += length
    return torch.stack(rows) if rows else v.new_zeros(v.shape)


def check_parity(
    jagged: Callable,
    lengths: list[int],
    *,
    heads: int = 2,
    attn_dim: int = 4,
    hidden_dim: int = 3,
    max_seq_len: int | None = None,
    alpha: float = 0.7,
    scaling_seqlen: int | None = None,
    causal: bool = True,
    window: int = 0,
    context: int = 0,
    targets: list[int] | None = None,
    group: int = 1,
    rab_heads: int = 0,
    seed: int = 0,
    device: str = "cpu",
    offsets_dtype: torch.dtype = torch.int64,
) -> None:
    x = jagged(lengths, heads=heads, attn_dim=attn_dim, hidden_dim=hidden_dim, max_seq_len=max_seq_len,
               rab_heads=rab_heads, seed=seed, device=device)  # fmt: skip
    num_targets = None if targets is None else torch.tensor(targets, device=device)
    got = hstu_attention(
        x.q, x.k, x.v, x.seq_offsets.to(offsets_dtype), x.max_seq_len, alpha=alpha, scaling_seqlen=scaling_seqlen,
        causal=causal, max_attn_len=window, contextual_seq_len=context, num_targets=num_targets,
        target_group_size=group, rab=x.rab,
    )  # fmt: skip
    want = naive_hstu(x.q, x.k, x.v, lengths, alpha=alpha, scale=scaling_seqlen or x.max_seq_len, causal=causal,
                      window=window, context=context, targets=targets, group=group, rab=x.rab)  # fmt: skip
    assert got.shape == (sum(lengths), heads, hidden_dim) and got.dtype == x.q.dtype
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if sum(lengths) == 0:
        return
    grad = torch.randn_like(got)
    inputs = [t for t in (x.q, x.k, x.v, x.rab) if t is not None]
    got_grads = torch.autograd.grad(got, inputs, grad)
    want_grads = torch.autograd.grad(want, inputs, grad, allow_unused=True, materialize_grads=True)
    for name, a, b in zip(("dq", "dk", "dv", "drab"), got_grads, want_grads, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


# Ragged lengths with 0 and 1 in every case; targets/context chosen so each rule is exercised somewhere.
LENGTHS = [3, 0, 5, 1, 6]
CASES = {
    "causal": dict(),
    "non_causal": dict(causal=False),
    "window": dict(window=2),
    "window_non_causal": dict(window=1, causal=False),
    "context": dict(context=2),
    "context_longer_than_some_sequences": dict(context=4),
    "context_window_non_causal": dict(context=1, window=1, causal=False),
    "targets_group_1": dict(targets=[1, 0, 2, 0, 3]),
    "targets_group_2": dict(targets=[2, 0, 3, 1, 5], group=2),
    "targets_group_3_non_causal": dict(targets=[3, 0, 5, 1, 4], group=3, causal=False),
    "all_targets": dict(targets=[3, 0, 5, 1, 6], group=2),
    "targets_context_window": dict(targets=[1, 0, 2, 1, 2], context=1, window=2),
    "targets_context_window_groups": dict(targets=[2, 0, 2, 0, 3], context=2, window=1, group=2, causal=False),
    "rab_shared": dict(rab_heads=1),
    "rab_per_head": dict(rab_heads=2),
    "rab_one_head": dict(rab_heads=1, heads=1),
    "rab_targets_context_window": dict(rab_heads=2, targets=[1, 0, 1, 1, 2], context=2, window=2),
    "scaling_seqlen_and_padding": dict(max_seq_len=9, scaling_seqlen=5, rab_heads=1),
    "attn_dim_ne_hidden_dim": dict(attn_dim=5, hidden_dim=2),
    "int32_offsets": dict(offsets_dtype=torch.int32, targets=[1, 0, 2, 0, 3]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity(jagged: Callable, case: str) -> None:
    check_parity(jagged, LENGTHS, **CASES[case])


def test_parity_empty_sequences_and_empty_batch(jagged: Callable) -> None:
    check_parity(jagged, [0, 0], rab_heads=1, targets=[0, 0])
    check_parity(jagged, [], max_seq_len=4)
    check_parity(jagged, [1], targets=[1], context=3)


@settings(max_examples=25, deadline=None, database=None)
@given(data=st.data())
def test_parity_hypothesis(jagged: Callable, data: st.DataObject) -> None:
    lengths = data.draw(st.lists(st.integers(0, 6), min_size=1, max_size=3), label="lengths")
    heads = data.draw(st.integers(1, 2), label="heads")
    use_targets = data.draw(st.booleans(), label="use_targets")
    targets = [data.draw(st.integers(0, n), label="targets") for n in lengths] if use_targets else None
    check_parity(
        jagged,
        lengths,
        heads=heads,
        attn_dim=data.draw(st.integers(1, 4), label="attn_dim"),
        hidden_dim=data.draw(st.integers(1, 4), label="hidden_dim"),
        max_seq_len=max([*lengths, 1]) + data.draw(st.integers(0, 2), label="padding"),
        alpha=data.draw(st.floats(-2.0, 2.0), label="alpha"),
        scaling_seqlen=data.draw(st.none() | st.integers(1, 8), label="scaling_seqlen"),
        causal=data.draw(st.booleans(), label="causal"),
        window=data.draw(st.integers(0, 3), label="window"),
        context=data.draw(st.integers(0, 3), label="context"),
        targets=targets,
        group=data.draw(st.integers(1, 3), label="group"),
        rab_heads=data.draw(st.sampled_from([0, 1, heads]), label="rab_heads"),
        seed=data.draw(st.integers(0, 2**16), label="seed"),
    )


def _mask(length: int, n: int, **kw: object) -> list[list[int]]:
    targets = kw.pop("num_targets", None)
    nt = None if targets is None else torch.tensor([targets])
    return hstu_valid_mask(torch.tensor([length]), n, num_targets=nt, **kw)[0].int().tolist()  # type: ignore[arg-type]


def test_mask_context_and_targets_group_1() -> None:
    # L=5 in N=6: row/col 0 context, 1-2 history, 3-4 targets, 5 padding.
    assert _mask(5, 6, contextual_seq_len=1, num_targets=2) == [
        [1, 1, 1, 0, 0, 0],  # context row: the whole history, no targets
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],  # target: history and itself
        [1, 1, 1, 0, 1, 0],  # target: history and itself, never the other target
        [0, 0, 0, 0, 0, 0],  # padding
    ]


def test_mask_target_groups() -> None:
    # Two targets in one group see each other causally.
    assert _mask(5, 5, contextual_seq_len=1, num_targets=2, target_group_size=2) == [
        [1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ]
    # Three targets in groups {3, 4} and {5}; causal=False changes the history only, targets stay causal.
    assert _mask(6, 6, num_targets=3, target_group_size=2, causal=False) == [
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 1],
    ]


def test_mask_local_window() -> None:
    assert _mask(4, 4, max_attn_len=1) == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    assert _mask(4, 4, max_attn_len=1, causal=False) == [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]
    # L=7, C=1, T=2, W=2: context column 0 is always visible, the context row ignores the window, targets (at
    # position Hh=5) read history columns 3-4 only (plus context), history rows a causal window of 2.
    assert _mask(7, 7, max_attn_len=2, contextual_seq_len=1, num_targets=2) == [
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 1, 0, 0],
        [1, 0, 0, 1, 1, 1, 0],
        [1, 0, 0, 1, 1, 0, 1],
    ]


def test_mask_edge_lengths() -> None:
    assert _mask(0, 3) == [[0] * 3] * 3
    assert _mask(1, 2, num_targets=1) == [[1, 0], [0, 0]]  # a lone target sees itself
    # A sequence shorter than the context is all context: full attention over it.
    assert _mask(3, 3, contextual_seq_len=5) == [[1, 1, 1]] * 3
    # History shorter than the context: context = the whole history, targets still only see their group.
    assert _mask(4, 4, contextual_seq_len=3, num_targets=2) == [
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 0, 1],
    ]


@pytest.mark.parametrize(
    ("causal", "window", "context", "group"), list(itertools.product([True, False], [0, 1, 3], [0, 2], [1, 2]))
)
def test_mask_matches_rules_exhaustively(causal: bool, window: int, context: int, group: int) -> None:
    lengths, n = [0, 1, 2, 5, 7, 7, 7], 8
    for targets in ([0, 1, 0, 2, 3, 0, 7], [0, 0, 2, 5, 1, 4, 6]):
        nt = torch.tensor(targets)
        got = hstu_valid_mask(torch.tensor(lengths), n, causal=causal, max_attn_len=window,
                              contextual_seq_len=context, num_targets=nt, target_group_size=group)  # fmt: skip
        rules = dict(context=context, causal=causal, window=window, group=group)
        assert torch.equal(got, naive_mask(lengths, n, targets, **rules))
    # No targets at all (the fast path when there is no context either).
    got = hstu_valid_mask(torch.tensor(lengths), n, causal=causal, max_attn_len=window, contextual_seq_len=context)
    assert torch.equal(got, naive_mask(lengths, n, None, context=context, causal=causal, window=window, group=group))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("case", ["causal", "non_causal", "targets_context_window_groups", "rab_per_head",
                                  "scaling_seqlen_and_padding", "attn_dim_ne_hidden_dim"])  # fmt: skip
def test_parity_cuda(jagged: Callable, case: str) -> None:
    check_parity(jagged, LENGTHS, device="cuda", **CASES[case])
