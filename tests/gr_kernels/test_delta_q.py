"""Delta q (``q_offsets``: queries are the last tokens of each sequence) against slicing full-sequence attention.

Every delta-q result must equal the query rows of the full (``q_offsets=None``) computation: the output, dq on the
query rows, and dk, dv, drab with the output gradient zero on every non-query row. Tolerances: float64 as in
test_parity.py; float32 torch's defaults; bf16 by the kernels issue's rule, the delta-q error against the float64
truth at most 2x (forward) / 5x (backward) the error of the full bf16 computation, plus one bf16 unit at the
largest exact value (the same padded matmuls in other shapes may round differently).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import gr_kernels
from gr_kernels import AttentionCall, HSTUParams, ReferenceBackend, hstu_attention, hstu_valid_mask
from gr_kernels.backends import _LOGGED_SKIPS, resolve_backend
from gr_kernels.cutlass_backend import NATIVE_DELTA_Q_ENV
from tests.gr_kernels.native_cases import MASK_FAMILIES, needs_sm90, rounding_floor


def query_rows(seq_offsets: Tensor, q_lengths: list[int]) -> Tensor:
    """Rows of the full jagged tensors that hold each sequence's last ``q_lengths[b]`` tokens."""
    ends = seq_offsets.tolist()[1:]
    return torch.cat(
        [torch.zeros(0), *(torch.arange(end - n, end) for end, n in zip(ends, q_lengths, strict=True))]
    ).long()


def q_offsets_of(q_lengths: list[int], dtype: torch.dtype = torch.int64) -> Tensor:
    return torch.tensor([0, *torch.tensor(q_lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=dtype)


def run_both(x, q_lengths: list[int], grad_seed: int = 0, max_q_len: int | None = None, **kw: object):
    """(delta output, full output rows, delta grads, full grads) for q/k/v (and x.rab, when there is one, which
    both calls use); grads None when there are no queries."""
    kw["rab"] = x.rab
    rows = query_rows(x.seq_offsets, q_lengths)
    q_delta = x.q.detach()[rows].requires_grad_()
    full = hstu_attention(x.q, x.k, x.v, x.seq_offsets, x.max_seq_len, **kw)  # type: ignore[arg-type]
    delta = hstu_attention(q_delta, x.k, x.v, x.seq_offsets, x.max_seq_len, q_offsets=q_offsets_of(q_lengths),
                           max_q_len=max_q_len, **kw)  # type: ignore[arg-type]  # fmt: skip
    if rows.numel() == 0:
        return delta, full[rows], None, None
    gen = torch.Generator().manual_seed(grad_seed)
    grad = torch.randn(delta.shape, generator=gen, dtype=torch.float64).to(delta.dtype)
    grad_full = torch.zeros_like(full).index_copy_(0, rows, grad)
    extra = [x.rab] if x.rab is not None else []
    got = torch.autograd.grad(delta, [q_delta, x.k, x.v, *extra], grad)
    want = list(torch.autograd.grad(full, [x.q, x.k, x.v, *extra], grad_full))
    want[0] = want[0][rows]
    return delta, full[rows], got, want


NAMES = ("dq", "dk", "dv", "drab")


def check_delta_exact(jagged: Callable, lengths: list[int], q_lengths: list[int], *, heads: int = 2,
                      attn_dim: int = 4, hidden_dim: int = 3, max_seq_len: int | None = None, rab_heads: int = 0,
                      seed: int = 0, dtype: torch.dtype = torch.float64, **kw: object) -> None:  # fmt: skip
    """float64 / float32 parity of the delta-q call with the full call's query rows."""
    x = jagged(lengths, heads=heads, attn_dim=attn_dim, hidden_dim=hidden_dim, max_seq_len=max_seq_len,
               rab_heads=rab_heads, seed=seed, dtype=dtype)  # fmt: skip
    kw.setdefault("alpha", 0.7)
    delta, want, got_grads, want_grads = run_both(x, q_lengths, grad_seed=seed, **kw)
    assert delta.shape == (sum(q_lengths), heads, hidden_dim) and delta.dtype == dtype
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else {}
    torch.testing.assert_close(delta, want, **tol)
    if got_grads is None:
        return
    for name, a, b in zip(NAMES[: len(got_grads)], got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")


# Ragged kv lengths with 0 and 1; query counts with 0, 1, some and all (q_len == kv_len).
LENGTHS = [3, 0, 5, 1, 6, 4]
Q_LENGTHS = [2, 0, 5, 1, 1, 0]
CASES = {
    "causal": dict(),
    "non_causal": dict(causal=False),
    "window": dict(max_attn_len=2),
    "window_non_causal": dict(max_attn_len=1, causal=False),
    "context": dict(contextual_seq_len=2),
    "context_longer_than_some_sequences": dict(contextual_seq_len=4),
    "targets_group_1": dict(num_targets=[1, 0, 2, 0, 3, 1]),
    "targets_group_2": dict(num_targets=[2, 0, 3, 1, 5, 4], target_group_size=2),
    "targets_group_3_non_causal": dict(num_targets=[3, 0, 5, 1, 4, 2], target_group_size=3, causal=False),
    "targets_context_window": dict(num_targets=[1, 0, 2, 1, 2, 1], contextual_seq_len=1, max_attn_len=2),
    "rab_shared": dict(rab_heads=1),
    "rab_per_head": dict(rab_heads=2),
    "rab_targets_context_window": dict(
        rab_heads=2, num_targets=[1, 0, 1, 1, 2, 0], contextual_seq_len=2, max_attn_len=2
    ),
    "scaling_seqlen_and_padding": dict(max_seq_len=9, scaling_seqlen=5, rab_heads=1),
    "attn_dim_ne_hidden_dim": dict(attn_dim=5, hidden_dim=2),
}


def _kwargs(case: dict) -> dict:
    kw = dict(case)
    if "num_targets" in kw:
        kw["num_targets"] = torch.tensor(kw["num_targets"])
    return kw


@pytest.mark.parametrize("case", sorted(CASES))
def test_delta_matches_full_rows_float64(jagged: Callable, case: str) -> None:
    check_delta_exact(jagged, LENGTHS, Q_LENGTHS, **_kwargs(CASES[case]))


@pytest.mark.parametrize("case", ["causal", "targets_group_2", "rab_targets_context_window"])
def test_delta_matches_full_rows_float32(jagged: Callable, case: str) -> None:
    check_delta_exact(jagged, LENGTHS, Q_LENGTHS, dtype=torch.float32, **_kwargs(CASES[case]))


def test_all_queries_equals_full_attention(jagged: Callable) -> None:
    # q_offsets == seq_offsets: the delta call is the full call.
    check_delta_exact(jagged, LENGTHS, LENGTHS, rab_heads=1, num_targets=torch.tensor([1, 0, 2, 0, 3, 1]))


def test_empty_and_edge_batches(jagged: Callable) -> None:
    check_delta_exact(jagged, [0, 0], [0, 0], rab_heads=1)  # nothing at all
    check_delta_exact(jagged, [4, 2], [0, 0], max_seq_len=5, rab_heads=2)  # keys but no queries
    check_delta_exact(jagged, [], [], max_seq_len=4)  # B = 0
    check_delta_exact(jagged, [1], [1], num_targets=torch.tensor([1]), contextual_seq_len=3)
    check_delta_exact(jagged, [7], [1], max_seq_len=7, max_attn_len=2, rab_heads=1)  # one new event


def test_max_q_len_bounds_the_padding_not_the_result(jagged: Callable) -> None:
    x = jagged(LENGTHS, rab_heads=1, seed=3)
    kw = dict(alpha=0.5, num_targets=torch.tensor([1, 0, 2, 0, 3, 1]), contextual_seq_len=1)
    loose, want, loose_grads, _ = run_both(x, Q_LENGTHS, **kw)
    tight, _, tight_grads, _ = run_both(x, Q_LENGTHS, max_q_len=max(Q_LENGTHS), **kw)
    torch.testing.assert_close(tight, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tight, loose, rtol=1e-10, atol=1e-12)
    for a, b in zip(tight_grads, loose_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@settings(max_examples=30, deadline=None, database=None)
@given(data=st.data())
def test_delta_hypothesis(jagged: Callable, data: st.DataObject) -> None:
    lengths = data.draw(st.lists(st.integers(0, 7), min_size=1, max_size=4), label="lengths")
    q_lengths = [data.draw(st.integers(0, n), label="q_len") for n in lengths]
    heads = data.draw(st.integers(1, 2), label="heads")
    use_targets = data.draw(st.booleans(), label="use_targets")
    targets = [data.draw(st.integers(0, n), label="targets") for n in lengths] if use_targets else None
    check_delta_exact(
        jagged,
        lengths,
        q_lengths,
        heads=heads,
        attn_dim=data.draw(st.integers(1, 4), label="attn_dim"),
        hidden_dim=data.draw(st.integers(1, 4), label="hidden_dim"),
        max_seq_len=max([*lengths, 1]) + data.draw(st.integers(0, 2), label="padding"),
        rab_heads=data.draw(st.sampled_from([0, 1, heads]), label="rab_heads"),
        seed=data.draw(st.integers(0, 2**16), label="seed"),
        dtype=data.draw(st.sampled_from([torch.float64, torch.float32]), label="dtype"),
        alpha=data.draw(st.floats(-2.0, 2.0), label="alpha"),
        scaling_seqlen=data.draw(st.none() | st.integers(1, 8), label="scaling_seqlen"),
        causal=data.draw(st.booleans(), label="causal"),
        max_attn_len=data.draw(st.integers(0, 3), label="window"),
        contextual_seq_len=data.draw(st.integers(0, 3), label="context"),
        num_targets=None if targets is None else torch.tensor(targets),
        target_group_size=data.draw(st.integers(1, 3), label="group"),
    )


# ------------------------------------------------------------------------------------------------------- bf16
def _max_err(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_delta_bf16(jagged: Callable, lengths: list[int], q_lengths: list[int], seed: int, rab_heads: int,
                     **kw: object) -> None:  # fmt: skip
    exact = jagged(lengths, heads=2, attn_dim=8, hidden_dim=8, rab_heads=rab_heads, seed=seed, dtype=torch.float64)
    low = jagged(lengths, heads=2, attn_dim=8, hidden_dim=8, rab_heads=rab_heads, seed=seed, dtype=torch.bfloat16)
    kw.setdefault("alpha", 0.5)
    _, truth, _, truth_grads = run_both(exact, q_lengths, grad_seed=seed, **kw)
    delta, full, delta_grads, full_grads = run_both(low, q_lengths, grad_seed=seed, **kw)
    assert delta.dtype == torch.bfloat16

    def floor(x: Tensor) -> float:
        return max(torch.finfo(torch.bfloat16).eps * x.abs().max().item(), 1e-5) if x.numel() else 1e-5

    assert _max_err(delta, truth) <= 2 * _max_err(full, truth) + floor(truth), "forward"
    if truth_grads is None:
        return
    assert len(delta_grads) == (4 if rab_heads else 3)
    for name, d, f, t in zip(NAMES[: len(delta_grads)], delta_grads, full_grads, truth_grads, strict=True):
        assert d.dtype == torch.bfloat16
        assert _max_err(d, t) <= 5 * _max_err(f, t) + floor(t), name


@settings(max_examples=12, deadline=None, database=None)
@given(data=st.data())
def test_delta_bf16_hypothesis(jagged: Callable, data: st.DataObject) -> None:
    lengths = data.draw(st.lists(st.integers(0, 12), min_size=1, max_size=3), label="lengths")
    q_lengths = [data.draw(st.integers(0, n), label="q_len") for n in lengths]
    use_targets = data.draw(st.booleans(), label="use_targets")
    targets = [data.draw(st.integers(0, n), label="targets") for n in lengths] if use_targets else None
    check_delta_bf16(
        jagged,
        lengths,
        q_lengths,
        seed=data.draw(st.integers(0, 2**16), label="seed"),
        rab_heads=data.draw(st.sampled_from([0, 1, 2]), label="rab_heads"),
        causal=data.draw(st.booleans(), label="causal"),
        max_attn_len=data.draw(st.integers(0, 4), label="window"),
        contextual_seq_len=data.draw(st.integers(0, 3), label="context"),
        num_targets=None if targets is None else torch.tensor(targets),
        target_group_size=data.draw(st.integers(1, 3), label="group"),
    )


# ------------------------------------------------------------------------------------------- mask and dropout
def test_mask_rows_are_the_query_positions() -> None:
    lengths, q_lengths, n = torch.tensor([0, 1, 4, 7, 7]), torch.tensor([0, 1, 2, 7, 3]), 8
    for kw in (dict(), dict(causal=False, max_attn_len=2), dict(contextual_seq_len=2, max_attn_len=1),
               dict(num_targets=torch.tensor([0, 1, 1, 3, 2]), target_group_size=2, contextual_seq_len=1)):  # fmt: skip
        full = hstu_valid_mask(lengths, n, **kw)  # type: ignore[arg-type]
        delta = hstu_valid_mask(lengths, n, q_lengths=q_lengths, max_q_len=7, **kw)  # type: ignore[arg-type]
        assert delta.shape == (5, 7, n)
        for b in range(5):
            length, q = int(lengths[b]), int(q_lengths[b])
            assert torch.equal(delta[b, :q], full[b, length - q : length])
            assert not delta[b, q:].any()  # padding rows see nothing


def test_dropout_keeps_the_full_calls_rows(jagged: Callable) -> None:
    x = jagged(LENGTHS, rab_heads=2, seed=5)
    rows = query_rows(x.seq_offsets, Q_LENGTHS)
    qd = x.q.detach()[rows]
    kw = dict(alpha=0.6, rab=x.rab, num_targets=torch.tensor([1, 0, 2, 0, 3, 1]))
    torch.manual_seed(11)  # both calls draw the same dropout seed
    full = hstu_attention(x.q, x.k, x.v, x.seq_offsets, x.max_seq_len, dropout_p=0.4, **kw)  # type: ignore[arg-type]
    torch.manual_seed(11)
    delta = hstu_attention(qd, x.k, x.v, x.seq_offsets, x.max_seq_len, dropout_p=0.4, q_offsets=q_offsets_of(Q_LENGTHS),
                           **kw)  # type: ignore[arg-type]  # fmt: skip
    torch.testing.assert_close(delta, full[rows], rtol=1e-10, atol=1e-12)
    undropped = hstu_attention(x.q, x.k, x.v, x.seq_offsets, x.max_seq_len, **kw)  # type: ignore[arg-type]
    assert not torch.equal(delta, undropped[rows])  # dropout did drop something


def test_dropout_gradients_match_full_rows(jagged: Callable) -> None:
    x = jagged([4, 2, 5], heads=1, attn_dim=3, hidden_dim=2, rab_heads=1, seed=8)
    q_lengths = [2, 0, 5]
    rows = query_rows(x.seq_offsets, q_lengths)
    qd = x.q.detach()[rows].requires_grad_()

    def full(q: Tensor, k: Tensor, v: Tensor, rab: Tensor) -> Tensor:
        torch.manual_seed(2)
        return hstu_attention(q, k, v, x.seq_offsets, x.max_seq_len, alpha=0.5, rab=rab, dropout_p=0.3)[rows]

    def delta(q: Tensor, k: Tensor, v: Tensor, rab: Tensor) -> Tensor:
        torch.manual_seed(2)
        return hstu_attention(q, k, v, x.seq_offsets, x.max_seq_len, alpha=0.5, rab=rab, dropout_p=0.3,
                              q_offsets=q_offsets_of(q_lengths))  # fmt: skip

    out = delta(qd, x.k, x.v, x.rab)
    torch.testing.assert_close(out, full(x.q, x.k, x.v, x.rab), rtol=1e-10, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (qd, x.k, x.v, x.rab), g)
    want = torch.autograd.grad(full(x.q, x.k, x.v, x.rab), (x.q, x.k, x.v, x.rab), g)
    torch.testing.assert_close(got[0], want[0][rows], rtol=1e-10, atol=1e-12)
    for a, b in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------- custom ops and compile
def test_gradcheck(jagged: Callable) -> None:
    x = jagged([3, 1, 0, 3], heads=2, attn_dim=2, hidden_dim=2, rab_heads=2, seed=1)
    q_lengths = [1, 1, 0, 2]
    qd = x.q.detach()[query_rows(x.seq_offsets, q_lengths)].requires_grad_()

    def fn(q: Tensor, k: Tensor, v: Tensor, rab: Tensor) -> Tensor:
        return hstu_attention(q, k, v, x.seq_offsets, x.max_seq_len, alpha=0.8, rab=rab, contextual_seq_len=1,
                              num_targets=torch.tensor([1, 0, 0, 1]), q_offsets=q_offsets_of(q_lengths))  # fmt: skip

    assert torch.autograd.gradcheck(fn, (qd, x.k, x.v, x.rab), fast_mode=True)


@pytest.mark.parametrize("rab_heads", [0, 1])
def test_opcheck(jagged: Callable, rab_heads: int) -> None:
    x = jagged([3, 0, 4], heads=2, attn_dim=4, hidden_dim=3, rab_heads=rab_heads, seed=3, dtype=torch.float32)
    q_lengths = [1, 0, 3]
    qd = x.q.detach()[query_rows(x.seq_offsets, q_lengths)].requires_grad_()
    q_offsets = q_offsets_of(q_lengths)
    scalars = (x.max_seq_len, 0.5, 6, True, 2, 1, 2, 0.0, 0, "reference")
    args = (qd, x.k, x.v, x.seq_offsets, torch.tensor([1, 0, 2]), x.rab, *scalars, q_offsets, 3)
    torch.library.opcheck(torch.ops.gr_kernels.hstu_attention_fwd, args)
    out = torch.ops.gr_kernels.hstu_attention_fwd(*args)
    assert out.shape == (4, 2, 3)
    detached = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.gr_kernels.hstu_attention_bwd, (torch.randn(4, 2, 3), *detached))
    dq, dk, dv, drab = torch.ops.gr_kernels.hstu_attention_bwd(torch.randn(4, 2, 3), *detached)
    assert dq.shape == qd.shape and dk.shape == x.k.shape and dv.shape == x.v.shape
    assert (drab is None) == (rab_heads == 0)


def test_fake_impls_give_delta_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.empty(3, 2, 4), torch.empty(9, 2, 4), torch.empty(9, 2, 5)
        offsets, q_offsets, rab = torch.tensor([0, 4, 9]), torch.tensor([0, 1, 3]), torch.empty(2, 1, 6, 6)
        scalars = (6, 0.5, 6, True, 0, 0, 1, 0.0, 0, "reference")
        out = torch.ops.gr_kernels.hstu_attention_fwd(q, k, v, offsets, None, rab, *scalars, q_offsets, 2)
        assert out.shape == (3, 2, 5)
        grads = torch.ops.gr_kernels.hstu_attention_bwd(out, q, k, v, offsets, None, rab, *scalars, q_offsets, 2)
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape, rab.shape]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(jagged: Callable, backend: str) -> None:
    x = jagged([3, 0, 5], heads=2, attn_dim=4, hidden_dim=4, rab_heads=1, seed=4, dtype=torch.float32)
    q_lengths = [1, 0, 2]
    rows = query_rows(x.seq_offsets, q_lengths)
    qd = x.q.detach()[rows].requires_grad_()
    q_offsets, targets = q_offsets_of(q_lengths), torch.tensor([1, 0, 1])

    def fn(q: Tensor, k: Tensor, v: Tensor, rab: Tensor) -> Tensor:
        out = hstu_attention(q, k, v, x.seq_offsets, x.max_seq_len, alpha=0.5, rab=rab, num_targets=targets,
                             q_offsets=q_offsets, max_q_len=2)  # fmt: skip
        return (out * out).sum()

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    inputs = (qd, x.k, x.v, x.rab)
    got, want = compiled(*inputs), fn(*inputs)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs), strict=True):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------ backends
@pytest.fixture
def registered() -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        gr_kernels.unregister_backend(name)


class Recorder(ReferenceBackend):
    """The reference with delta q, recording the q_offsets it was handed."""

    def __init__(self, priority: int) -> None:
        self.priority = priority
        self.seen: list[Tensor | None] = []

    def forward(self, *args: object, q_offsets: Tensor | None = None) -> Tensor:
        self.seen.append(q_offsets)
        return super().forward(*args, q_offsets=q_offsets)  # type: ignore[arg-type]

    def backward(self, *args: object, q_offsets: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        self.seen.append(q_offsets)
        return super().backward(*args, q_offsets=q_offsets)  # type: ignore[arg-type]


class NoDeltaQ(ReferenceBackend):
    """A backend written before delta q: its methods take no q_offsets and its supports() does not know of it."""

    priority = 50

    def forward(self, q, k, v, seq_offsets, num_targets, rab, params):  # type: ignore[no-untyped-def, override]
        return super().forward(q, k, v, seq_offsets, num_targets, rab, params)

    def backward(self, grad_out, q, k, v, seq_offsets, num_targets, rab, params):  # type: ignore[no-untyped-def, override]
        return super().backward(grad_out, q, k, v, seq_offsets, num_targets, rab, params)


def _delta_call(device: str = "cpu") -> AttentionCall:
    params = HSTUParams(8, 1.0, 8, max_q_len=2)
    return AttentionCall(params, torch.device(device), torch.bfloat16, 2, 64, 64, torch.int64, False, 0, False, True)


def _small_delta(jagged: Callable, **kw: object) -> Tensor:
    x = jagged([3, 2], heads=1, attn_dim=4, hidden_dim=4, seed=6)
    qd = x.q.detach()[query_rows(x.seq_offsets, [1, 2])].requires_grad_()
    return hstu_attention(qd, x.k, x.v, x.seq_offsets, x.max_seq_len, alpha=1.0, q_offsets=q_offsets_of([1, 2]),
                          **kw)  # type: ignore[arg-type]  # fmt: skip


def test_cutlass_declines_delta_q_when_switched_off(
    jagged: Callable, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GR_KERNELS_NATIVE_DELTA_Q=0 sends delta-q calls to the reference, with a reason naming the switch.
    monkeypatch.setenv(NATIVE_DELTA_Q_ENV, "0")
    reason = gr_kernels.get_backend("cutlass").supports(_delta_call())
    assert reason is not None and "delta q" in reason and f"{NATIVE_DELTA_Q_ENV}=0" in reason
    with pytest.raises(ValueError, match="backend 'cutlass' cannot run this call: delta q"):
        _small_delta(jagged, backend="cutlass")
    _LOGGED_SKIPS.discard(("cutlass", reason))
    with caplog.at_level(logging.INFO, logger="gr_kernels"):
        assert resolve_backend("auto", _delta_call()) == "reference"
        assert resolve_backend("auto", _delta_call()) == "reference"
    lines = [r.getMessage() for r in caplog.records if "'cutlass' not used" in r.getMessage()]
    assert lines == [f"hstu_attention: backend 'cutlass' not used: {reason}"]


def test_native_delta_q_switch_is_read_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = gr_kernels.get_backend("cutlass")
    monkeypatch.setenv(NATIVE_DELTA_Q_ENV, "0")
    assert f"{NATIVE_DELTA_Q_ENV}=0" in (backend.supports(_delta_call()) or "")
    for value in ("1", "", "yes"):
        monkeypatch.setenv(NATIVE_DELTA_Q_ENV, value)
        # Not switched off, a delta-q call is judged like a full call: here only the CPU device (or a missing
        # build) stops it.
        reason = backend.supports(_delta_call())
        assert reason is not None and "delta q" not in reason
        assert reason == backend.supports(dataclasses.replace(_delta_call(), delta_q=False))
    assert "cutlass" in gr_kernels.backends._DELTA_Q  # its forward and backward take q_offsets


def test_backends_without_q_offsets_are_skipped(jagged: Callable, registered: list[str]) -> None:
    gr_kernels.register_backend("no_delta_test", NoDeltaQ())
    registered.append("no_delta_test")
    out = _small_delta(jagged)  # auto: falls past it to the reference instead of a TypeError
    out.sum().backward()
    with pytest.raises(ValueError, match=r"'no_delta_test' cannot run this call: delta q .* take no q_offsets"):
        _small_delta(jagged, backend="no_delta_test")


def test_backends_with_q_offsets_receive_them(jagged: Callable, registered: list[str]) -> None:
    rec = Recorder(priority=200)
    gr_kernels.register_backend("delta_test", rec)
    registered.append("delta_test")
    out = _small_delta(jagged, backend="delta_test")
    out.sum().backward()
    assert [t.tolist() for t in rec.seen] == [[0, 1, 3], [0, 1, 3]]  # forward, then backward
    x = jagged([3, 2], heads=1, attn_dim=4, hidden_dim=4, seed=6)
    hstu_attention(x.q, x.k, x.v, x.seq_offsets, x.max_seq_len, alpha=1.0, backend="delta_test")
    assert rec.seen[-1] is None  # full calls carry no q_offsets


# ---------------------------------------------------------------------------------------------- bad inputs
def _args() -> dict[str, object]:
    # Two sequences of lengths 2 and 3, queries the last 1 and 2 tokens: q has 3 rows, k/v 5.
    return dict(q=torch.zeros(3, 1, 4), k=torch.zeros(5, 1, 4), v=torch.zeros(5, 1, 4),
                seq_offsets=torch.tensor([0, 2, 5]), max_seq_len=3, alpha=1.0,
                q_offsets=torch.tensor([0, 1, 3]))  # fmt: skip


BAD = {
    "float": (dict(q_offsets=torch.tensor([0.0, 1.0, 3.0])), ValueError, r"q_offsets must be a 1-D int32/int64"),
    "2d": (dict(q_offsets=torch.tensor([[0, 1, 3]])), ValueError, r"q_offsets must be a 1-D .*\[B \+ 1 = 3\]"),
    "batch": (dict(q_offsets=torch.tensor([0, 3])), ValueError, r"q_offsets must be .*like seq_offsets, got"),
    "not_tensor": (dict(q_offsets=[0, 1, 3]), TypeError, "q_offsets must be None or a torch.Tensor"),
    "device": (dict(q_offsets=torch.tensor([0, 1, 3], device="meta")), ValueError, "q_offsets is on meta"),
    "end": (dict(q_offsets=torch.tensor([0, 1, 2])), ValueError, r"q_offsets must start at 0 and end at total_q"),
    "start": (dict(q_offsets=torch.tensor([1, 1, 3])), ValueError, "q_offsets must start at 0"),
    "decreasing": (
        dict(q=torch.zeros(1, 1, 4), q_offsets=torch.tensor([0, 2, 1])),
        ValueError,
        r"q_offsets must be non-decreasing, but q_offsets\[2\] < q_offsets\[1\]",
    ),
    "more_q_than_k": (
        dict(q_offsets=torch.tensor([0, 3, 3])),
        ValueError,
        "sequence 0 has 3 queries .* but only 2 keys",
    ),
    "over_max_q_len": (dict(max_q_len=1), ValueError, r"sequence 1 has 2 queries \(q_offsets\) > max_q_len=1"),
    "max_q_len_zero": (dict(max_q_len=0), ValueError, r"max_q_len must be an int in \[1, max_seq_len=3\]"),
    "max_q_len_big": (dict(max_q_len=4), ValueError, "max_q_len must be an int in"),
    "max_q_len_alone": (
        dict(q=torch.zeros(5, 1, 4), q_offsets=None, max_q_len=2),
        ValueError,
        "max_q_len is only meaningful with q_offsets",
    ),
    "k_heads": (
        dict(k=torch.zeros(5, 2, 4), v=torch.zeros(5, 2, 4)),
        ValueError,
        r"k must be \[total_tokens, heads=1, attn_dim=4\] like q",
    ),
    "v_tokens": (dict(v=torch.zeros(3, 1, 4)), ValueError, r"v must be \[total_tokens=5, heads=1"),
    "kv_offsets_end": (
        dict(seq_offsets=torch.tensor([0, 2, 4])),
        ValueError,
        "seq_offsets must start at 0 and end at total_tokens=5",
    ),
    "rab_rows": (dict(rab=torch.zeros(2, 1, 2, 3)), ValueError, r"rab must be \[B=2, 1 or heads=1, max_seq_len=3"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_argument(case: str) -> None:
    change, error, match = BAD[case]
    with pytest.raises(error, match=match):
        hstu_attention(**{**_args(), **change})  # type: ignore[arg-type]


def test_good_call_and_validate_off() -> None:
    out = hstu_attention(**_args())  # type: ignore[arg-type]
    assert out.shape == (3, 1, 4)
    # validate=False trusts the values; a query that would sit before its sequence's start (3 queries for 2 keys)
    # sees nothing, even without causality, instead of reading keys.
    args = {**_args(), "q": torch.ones(4, 1, 4), "k": torch.ones(5, 1, 4), "v": torch.ones(5, 1, 4)}
    args.update(q_offsets=torch.tensor([0, 3, 4]), max_q_len=3, causal=False, validate=False)
    out = hstu_attention(**args)  # type: ignore[arg-type]
    assert out.shape == (4, 1, 4) and torch.equal(out[0], torch.zeros(1, 4)) and (out[1:] > 0).all()


def test_reference_needs_max_q_len_with_q_offsets() -> None:
    q, offsets = torch.zeros(2, 1, 4), torch.tensor([0, 2])
    with pytest.raises(ValueError, match=r"needs params.max_q_len >= 1, got 0"):
        gr_kernels.reference_forward(q[:1], q, q, offsets, None, None, HSTUParams(2, 1.0, 2), torch.tensor([0, 1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "dim"), [(torch.float32, 8), (torch.bfloat16, 64)])
def test_cuda_matches_full_rows_without_sync(
    jagged: Callable, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, dim: int
) -> None:
    # The native path: bf16 at head dim 64 runs it on an sm90 GPU with a CUDA build (fp32, and any other GPU, run
    # the reference); either way the delta-q call must match the full call's rows and never sync.
    monkeypatch.delenv(NATIVE_DELTA_Q_ENV, raising=False)
    x = jagged([5, 0, 1, 7], heads=2, attn_dim=dim, hidden_dim=dim, rab_heads=2, seed=7, dtype=dtype,
               device="cuda")  # fmt: skip
    q_lengths = [2, 0, 1, 7]
    rows = query_rows(x.seq_offsets.cpu(), q_lengths).cuda()
    qd = x.q.detach()[rows].requires_grad_()
    q_offsets, targets = q_offsets_of(q_lengths).cuda(), torch.tensor([1, 0, 0, 2], device="cuda")
    kw = dict(alpha=0.4, rab=x.rab, num_targets=targets, contextual_seq_len=1)
    full = hstu_attention(x.q, x.k, x.v, x.seq_offsets, x.max_seq_len, **kw)  # type: ignore[arg-type]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = hstu_attention(qd, x.k, x.v, x.seq_offsets, x.max_seq_len, q_offsets=q_offsets, max_q_len=7,
                             validate=False, **kw)  # type: ignore[arg-type]  # fmt: skip
        grads = torch.autograd.grad(out, (qd, x.rab), torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tol = {} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, full[rows], **tol)
    assert grads[0].shape == qd.shape and grads[1].shape == x.rab.shape


# ------------------------------------------------------------------------------------- native kernels (sm90 GPU)

NATIVE_MASKS = MASK_FAMILIES
# Ragged kv lengths (0, 1, tile edges, past a tile) and query counts (0, 1, all, mid-tile, more than one tile).
NATIVE_LENGTHS = [0, 1, 130, 77, 200, 64]
NATIVE_Q_LENGTHS = [0, 1, 65, 77, 3, 64]


def _native_grads(backend: str, q: Tensor, k: Tensor, v: Tensor, rab: Tensor | None, grad: Tensor, **kw: object):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    bias = None if rab is None else rab.detach().clone().requires_grad_()
    out = hstu_attention(*leaves, rab=bias, backend=backend, **kw)  # type: ignore[arg-type]
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves] + ([] if bias is None else [bias.grad])


def check_native_delta(jagged: Callable, mask: str, rab_heads: int, *, dim: int = 64,
                       dtype: torch.dtype = torch.bfloat16, lengths: list[int] = NATIVE_LENGTHS,
                       q_lengths: list[int] = NATIVE_Q_LENGTHS, seed: int = 0) -> None:  # fmt: skip
    """Native delta q vs an fp32 reference: error <= 2x (out) / 5x (dq, dk, dv, drab) the reference's own error in
    ``dtype``, plus ``rounding_floor``."""
    opts = dict(NATIVE_MASKS[mask])
    x = jagged(lengths, heads=2, attn_dim=dim, hidden_dim=dim, rab_heads=rab_heads, seed=seed, dtype=torch.float32,
               device="cuda", requires_grad=False)  # fmt: skip
    rows = query_rows(x.seq_offsets.cpu(), q_lengths).cuda()
    if "num_targets" in opts:
        opts["num_targets"] = torch.tensor([min(opts["num_targets"], max(n - 1, 0)) for n in lengths], device="cuda")
    kw = dict(seq_offsets=x.seq_offsets, max_seq_len=x.max_seq_len, alpha=1.0 / dim**0.5,
              q_offsets=q_offsets_of(q_lengths).cuda(), max_q_len=max([*q_lengths, 1]), **opts)  # fmt: skip
    q32 = x.q[rows]
    grad = torch.randn(q32.shape[0], 2, dim, generator=torch.Generator().manual_seed(seed + 1)).cuda()
    low = [t.to(dtype) for t in (q32, x.k, x.v)]
    low_rab = None if x.rab is None else x.rab.to(dtype)
    got = _native_grads("cutlass", *low, low_rab, grad.to(dtype), **kw)
    ref_low = _native_grads("reference", *low, low_rab, grad.to(dtype), **kw)
    exact = _native_grads("reference", q32, x.k, x.v, x.rab, grad, **kw)
    names = ["out", "dq", "dk", "dv", "drab"][: 1 + len(exact[1])]  # no drab without a rab
    for name, g_, r_, e_ in zip(names, [got[0], *got[1]], [ref_low[0], *ref_low[1]], [exact[0], *exact[1]],
                                strict=True):  # fmt: skip
        assert g_.dtype == dtype and g_.shape == e_.shape, name
        if e_.numel() == 0:
            continue
        factor = 2 if name == "out" else 5
        err = (g_.float() - e_).abs().max().item()
        ref_err = (r_.float() - e_).abs().max().item()
        assert err <= factor * ref_err + rounding_floor(e_, dtype), (
            f"{name}: native error {err:.3e} > {factor} x reference-{dtype} error {ref_err:.3e}"
        )


@pytest.fixture(params=["sm90", "sm80"])
def native_delta(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Opts in to the native delta-q path and routes forwards to the Hopper or the SM80-MMA kernel."""
    monkeypatch.setenv(NATIVE_DELTA_Q_ENV, "1")
    monkeypatch.setenv("GR_KERNELS_FWD_KERNEL", request.param)
    return request.param


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize("mask", sorted(NATIVE_MASKS))
@pytest.mark.parametrize("rab_heads", [0, 1, 2])
def test_native_delta_matches_reference(jagged: Callable, mask: str, rab_heads: int, native_delta: str) -> None:
    check_native_delta(jagged, mask, rab_heads)


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_native_delta_dtypes_and_head_dims(jagged: Callable, dtype: torch.dtype, dim: int, native_delta: str) -> None:
    # Head dim 256 runs the native forward and the reference backward (see cutlass_backend.py).
    check_native_delta(jagged, "context_targets_window", 1, dim=dim, dtype=dtype, lengths=[1, 300, 129, 65],
                       q_lengths=[1, 131, 2, 65])  # fmt: skip


@needs_sm90
@pytest.mark.gpu
@settings(max_examples=30, deadline=None, database=None)
@given(data=st.data())
def test_native_delta_hypothesis(jagged: Callable, data: st.DataObject) -> None:
    lengths = data.draw(st.lists(st.integers(0, 300), min_size=1, max_size=5), label="lengths")
    q_lengths = [data.draw(st.integers(0, n), label="q_len") for n in lengths]
    mask = data.draw(st.sampled_from(sorted(NATIVE_MASKS)), label="mask")
    kernel = data.draw(st.sampled_from(["sm90", "sm80"]), label="kernel")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(NATIVE_DELTA_Q_ENV, "1")
        mp.setenv("GR_KERNELS_FWD_KERNEL", kernel)
        check_native_delta(jagged, mask, data.draw(st.sampled_from([0, 1, 2]), label="rab_heads"),
                           dim=data.draw(st.sampled_from([64, 128]), label="dim"), lengths=lengths,
                           q_lengths=q_lengths, seed=data.draw(st.integers(0, 1000), label="seed"))  # fmt: skip


@needs_sm90
@pytest.mark.gpu
def test_native_delta_is_the_default_and_the_switch_opts_out(monkeypatch: pytest.MonkeyPatch) -> None:
    call = AttentionCall(HSTUParams(8, 1.0, 8, max_q_len=2), torch.device("cuda"), torch.bfloat16, 2, 64, 64,
                         torch.int64, False, 0, False, True)  # fmt: skip
    monkeypatch.delenv(NATIVE_DELTA_Q_ENV, raising=False)
    assert resolve_backend("auto", call) == "cutlass"
    monkeypatch.setenv(NATIVE_DELTA_Q_ENV, "0")
    assert resolve_backend("auto", call) != "cutlass"
