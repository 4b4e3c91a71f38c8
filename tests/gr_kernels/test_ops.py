"""The custom ops (opcheck, gradcheck, torch.compile), dropout and low-precision behaviour of hstu_attention."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from gr_kernels import hstu_attention


def _fwd_args(jagged: Callable, rab_heads: int, with_targets: bool, dropout_p: float = 0.0) -> tuple:
    x = jagged([3, 0, 4, 1], heads=2, attn_dim=4, hidden_dim=3, rab_heads=rab_heads, seed=3, dtype=torch.float32)
    targets = torch.tensor([1, 0, 2, 1]) if with_targets else None
    # q, k, v, seq_offsets, num_targets, rab, max_seq_len, alpha, scaling_seqlen, causal, max_attn_len,
    # contextual_seq_len, target_group_size, dropout_p, dropout_seed, backend
    return (x.q, x.k, x.v, x.seq_offsets, targets, x.rab, x.max_seq_len, 0.5, 6, True, 2, 1, 2, dropout_p, 1234,
            "reference")  # fmt: skip


@pytest.mark.parametrize(("rab_heads", "with_targets", "dropout_p"), [(0, False, 0.0), (1, True, 0.0), (2, False, 0.2),
                                                                      (0, True, 0.3)])  # fmt: skip
def test_opcheck(jagged: Callable, rab_heads: int, with_targets: bool, dropout_p: float) -> None:
    args = _fwd_args(jagged, rab_heads, with_targets, dropout_p)
    torch.library.opcheck(torch.ops.gr_kernels.hstu_attention_fwd, args)
    grad_out = torch.randn(args[2].shape[0], args[2].shape[1], args[2].shape[2])
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.gr_kernels.hstu_attention_bwd, (grad_out, *detached))
    dq, dk, dv, drab = torch.ops.gr_kernels.hstu_attention_bwd(grad_out, *detached)
    assert dq.shape == args[0].shape and dk.shape == args[1].shape and dv.shape == args[2].shape
    assert (drab is None) == (rab_heads == 0)
    if drab is not None:
        assert drab.shape == args[5].shape


def test_fake_impls_give_shapes_without_running() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.empty(9, 2, 4), torch.empty(9, 2, 4), torch.empty(9, 2, 5)
        offsets, rab = torch.tensor([0, 4, 9]), torch.empty(2, 1, 6, 6)
        scalars = (6, 0.5, 6, True, 0, 0, 1, 0.0, 0, "reference")
        out = torch.ops.gr_kernels.hstu_attention_fwd(q, k, v, offsets, None, rab, *scalars)
        assert out.shape == (9, 2, 5) and out.dtype == q.dtype
        grads = torch.ops.gr_kernels.hstu_attention_bwd(out, q, k, v, offsets, None, None, *scalars)
        assert [g.shape for g in grads[:3]] == [q.shape, k.shape, v.shape] and grads[3] is None
        grads = torch.ops.gr_kernels.hstu_attention_bwd(out, q, k, v, offsets, None, rab, *scalars)
        assert grads[3].shape == rab.shape


@pytest.mark.parametrize("rab_heads", [0, 1, 2])
def test_gradcheck(jagged: Callable, rab_heads: int) -> None:
    x = jagged([3, 1, 0, 2], heads=2, attn_dim=3, hidden_dim=2, rab_heads=rab_heads, seed=1)
    targets = torch.tensor([1, 0, 0, 1])

    def fn(*inputs: torch.Tensor) -> torch.Tensor:
        q, k, v, *rab = inputs
        return hstu_attention(q, k, v, x.seq_offsets, x.max_seq_len, alpha=0.8, num_targets=targets,
                              contextual_seq_len=1, rab=rab[0] if rab else None)  # fmt: skip

    inputs = tuple(t for t in (x.q, x.k, x.v, x.rab) if t is not None)
    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_with_dropout(jagged: Callable) -> None:
    x = jagged([3, 1, 2], heads=1, attn_dim=2, hidden_dim=2, rab_heads=1, seed=2)

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rab: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(5)  # the same dropout seed, hence keep-mask, on every evaluation
        return hstu_attention(q, k, v, x.seq_offsets, x.max_seq_len, alpha=0.5, rab=rab, dropout_p=0.4,
                              num_targets=torch.tensor([1, 0, 1]))  # fmt: skip

    assert torch.autograd.gradcheck(fn, (x.q, x.k, x.v, x.rab))


def test_dropout_reproducible_and_off_in_eval(jagged: Callable) -> None:
    x = jagged([5, 3], heads=2, attn_dim=4, hidden_dim=4, seed=2)

    def run(**kw: object) -> torch.Tensor:
        return hstu_attention(x.q, x.k, x.v, x.seq_offsets, x.max_seq_len, alpha=1.0, **kw)  # type: ignore[arg-type]

    torch.manual_seed(0)
    a = run(dropout_p=0.5)
    torch.manual_seed(0)
    b = run(dropout_p=0.5)
    c = run(dropout_p=0.5)  # the generator moved on: another mask
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    torch.testing.assert_close(run(dropout_p=0.5, training=False), run(), rtol=0, atol=0)
    # The seed comes from the default generator only when dropout is on.
    state = torch.get_rng_state()
    run(dropout_p=0.5, training=False)
    assert torch.equal(state, torch.get_rng_state())


def test_dropout_drops_weights_with_inverted_scaling() -> None:
    # With v one-hot in the key position, output row i is the weight row A[i, :] itself, dropout included.
    lengths, n, heads, p = [16, 16, 11], 16, 2, 0.3
    total = sum(lengths)
    offsets = torch.tensor([0, 16, 32, 43])
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(total, heads, 4, generator=gen, dtype=torch.float64)
    k = torch.randn(total, heads, 4, generator=gen, dtype=torch.float64)
    position = torch.cat([torch.arange(length) for length in lengths])
    v = torch.nn.functional.one_hot(position, n).to(torch.float64).unsqueeze(1).expand(total, heads, n).contiguous()
    kw = dict(alpha=0.5, num_targets=torch.tensor([2, 0, 3]), target_group_size=2)
    dense = hstu_attention(q, k, v, offsets, n, **kw)
    torch.manual_seed(1)
    dropped = hstu_attention(q, k, v, offsets, n, dropout_p=p, **kw)
    live = dense != 0
    kept = dropped != 0
    assert not (kept & ~live).any()  # dropout never revives a masked weight
    torch.testing.assert_close(dropped[kept], dense[kept] / (1 - p), rtol=1e-12, atol=0)
    drop_rate = 1 - kept[live].double().mean().item()
    assert abs(drop_rate - p) < 0.06, drop_rate


@pytest.mark.parametrize("rab_heads", [0, 1])
def test_torch_compile_fullgraph(jagged: Callable, rab_heads: int) -> None:
    x = jagged([3, 0, 2], heads=2, attn_dim=4, hidden_dim=4, rab_heads=rab_heads, seed=4, dtype=torch.float32)
    targets = torch.tensor([1, 0, 1])

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rab: torch.Tensor | None) -> torch.Tensor:
        out = hstu_attention(q, k, v, x.seq_offsets, x.max_seq_len, alpha=0.5, rab=rab, num_targets=targets)
        return (out * out).sum()

    # Inductor (the default) once; the cheaper aot_eager covers the rab variant.
    compiled = torch.compile(fn, fullgraph=True, backend="inductor" if rab_heads else "aot_eager")
    inputs = [x.q, x.k, x.v]
    got = compiled(*inputs, x.rab)
    want = fn(*inputs, x.rab)
    torch.testing.assert_close(got, want)
    with_rab = [*inputs, *([x.rab] if x.rab is not None else [])]
    for a, b in zip(torch.autograd.grad(got, with_rab), torch.autograd.grad(want, with_rab), strict=True):
        torch.testing.assert_close(a, b)


def test_bf16_and_fp16_close_to_fp32(jagged: Callable) -> None:
    x = jagged([6, 4, 0, 1], heads=2, attn_dim=8, hidden_dim=8, rab_heads=1, seed=5, dtype=torch.float32)
    kw = dict(alpha=0.3, num_targets=torch.tensor([1, 0, 0, 1]), contextual_seq_len=1)
    ref = hstu_attention(x.q, x.k, x.v, x.seq_offsets, x.max_seq_len, rab=x.rab, **kw)
    ref_grads = torch.autograd.grad(ref.sum(), (x.q, x.rab))
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v, rab = (t.detach().to(dtype).requires_grad_() for t in (x.q, x.k, x.v, x.rab))
        low = hstu_attention(q, k, v, x.seq_offsets, x.max_seq_len, rab=rab, **kw)
        assert low.dtype == dtype
        torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.02)
        dq, drab = torch.autograd.grad(low.sum(), (q, rab))
        assert dq.dtype == dtype and drab.dtype == dtype
        torch.testing.assert_close(dq.float(), ref_grads[0], rtol=0.05, atol=0.03)
        torch.testing.assert_close(drab.float(), ref_grads[1], rtol=0.05, atol=0.03)


def test_rab_of_another_dtype_is_cast(jagged: Callable) -> None:
    # An fp32 bias (say a parameter) with bf16 q/k/v (say from autocast): computed as bf16, gradient back in fp32.
    x = jagged([4, 2], heads=2, attn_dim=4, hidden_dim=4, rab_heads=1, seed=9, dtype=torch.bfloat16)
    rab32 = x.rab.detach().float().requires_grad_()
    out = hstu_attention(x.q, x.k, x.v, x.seq_offsets, x.max_seq_len, alpha=0.5, rab=rab32)
    want = hstu_attention(x.q, x.k, x.v, x.seq_offsets, x.max_seq_len, alpha=0.5, rab=x.rab)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(out.float().sum(), rab32)
    (want_grad,) = torch.autograd.grad(want.float().sum(), x.rab)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, want_grad.float(), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_cuda_dropout_no_sync_and_bf16(jagged: Callable) -> None:
    x = jagged([5, 0, 1, 7], heads=2, attn_dim=8, hidden_dim=8, rab_heads=2, seed=7, dtype=torch.float32,
               device="cuda")  # fmt: skip
    targets = torch.tensor([1, 0, 0, 2], device="cuda")

    def run(validate: bool = True, **kw: object) -> torch.Tensor:
        return hstu_attention(x.q, x.k, x.v, x.seq_offsets, x.max_seq_len, alpha=0.4, rab=x.rab, num_targets=targets,
                              contextual_seq_len=1, validate=validate, **kw)  # type: ignore[arg-type]  # fmt: skip

    torch.manual_seed(3)
    a = run(dropout_p=0.3)
    torch.manual_seed(3)
    b = run(dropout_p=0.3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Without validation, neither the forward nor the backward (dropout included) waits on the device.
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = run(validate=False, dropout_p=0.3)
        grads = torch.autograd.grad(out, (x.q, x.rab), torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert grads[1].shape == x.rab.shape
    low = hstu_attention(*(t.bfloat16() for t in (x.q, x.k, x.v)), x.seq_offsets, x.max_seq_len, alpha=0.4,
                         rab=x.rab.bfloat16(), num_targets=targets, contextual_seq_len=1)  # fmt: skip
    torch.testing.assert_close(low.float(), run(), rtol=0.05, atol=0.02)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_cuda_compile(jagged: Callable) -> None:
    x = jagged([5, 0, 3], heads=2, attn_dim=8, hidden_dim=8, rab_heads=1, seed=8, dtype=torch.float32, device="cuda")

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rab: torch.Tensor) -> torch.Tensor:
        return hstu_attention(q, k, v, x.seq_offsets, x.max_seq_len, alpha=0.5, rab=rab).square().sum()

    got = torch.compile(fn, fullgraph=True)(x.q, x.k, x.v, x.rab)
    want = fn(x.q, x.k, x.v, x.rab)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (x.q, x.rab)), torch.autograd.grad(want, (x.q, x.rab)), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("rab_heads", "with_targets"), [(0, False), (2, True)])
def test_eager_calls_skip_the_op_dispatch_and_equal_it(jagged: Callable, rab_heads: int, with_targets: bool) -> None:
    """Eager ``hstu_attention`` runs ``EagerHSTUAttention`` (no torch.library dispatch) under the op's profiler names,
    with the op's values and gradients; Dynamo still records the custom op."""
    from gr_kernels import ops

    args = _fwd_args(jagged, rab_heads, with_targets)
    leaves = [a for a in args[:6] if isinstance(a, torch.Tensor) and a.is_floating_point()]
    grad_out = torch.randn(args[0].shape[0], args[0].shape[1], args[2].shape[2])

    def run(fn: Callable) -> tuple[torch.Tensor, ...]:
        for t in leaves:
            t.grad = None
        out = fn(*args[:6], args[6:16], None, 0)
        out.backward(grad_out)
        return (out.detach(), *(t.grad.clone() for t in leaves))

    def through_the_op(q, k, v, offsets, targets, rab, scalars, q_offsets, max_q_len):
        return torch.ops.gr_kernels.hstu_attention_fwd(q, k, v, offsets, targets, rab, *scalars, q_offsets, max_q_len)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        eager = run(ops.attention_op)
    names = {e.name for e in prof.events()}
    assert {"gr_kernels::hstu_attention_fwd", "gr_kernels::hstu_attention_bwd"} <= names
    assert "GeneratedBackwardFor_gr_kernels_hstu_attention_fwd_default" not in names  # the op's autograd wrapper
    for a, b in zip(eager, run(through_the_op), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    seen: list[str] = []

    def backend(gm: torch.fx.GraphModule, _inputs: list) -> Callable:
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(ops.attention_op, backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(*args[:6], args[6:16], None, 0), eager[0])
    assert any(t.startswith("gr_kernels.hstu_attention_fwd") for t in seen), seen


def test_op_range_opens_a_profiler_range_only_while_one_records() -> None:
    """The eager paths' profiler ranges cost nothing when no profiler records (record_function dispatches even then)."""
    import contextlib

    from gr_kernels.profiling import op_range

    assert isinstance(op_range("gr_kernels::x"), contextlib.nullcontext)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        assert isinstance(op_range("gr_kernels::x"), torch.profiler.record_function)
        with op_range("gr_kernels::x"):
            pass
    assert "gr_kernels::x" in {e.name for e in prof.events()}
