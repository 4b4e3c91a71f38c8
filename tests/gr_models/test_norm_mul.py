"""``gr_models.modules.norm_mul.layer_norm_mul`` (``u * LayerNorm(x)`` fused, the HSTU block's gating) against the
PyTorch reference, values and every gradient.

- CPU: the Triton kernels in the interpreter (``INTERPRET_ON_CPU``; 2-row programs, so small shapes span several
  programs and a row tail; hypothesis shapes, strided ``u`` as the block's column slice of its projection), fp32 and
  fp16; the op without Triton (reference path); ``opcheck``; the HSTU block with ``fused_norms`` equals the eager
  one.
- GPU (``-m gpu``): compiled kernels in bf16/fp16/fp32 at a training-like shape and under bf16 autocast.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gr_models.modules import norm_mul
from gr_models.modules.hstu import HSTUBlock, HSTUConfig
from gr_models.modules.norm_mul import layer_norm_mul, reference_layer_norm_mul
from tests.gr_models.block_parity import assert_cuda_block_close_under_autocast, assert_fused_block_equals_unfused
from tests.gr_models.triton_marks import needs_cuda, needs_triton


@pytest.fixture(autouse=True)
def interpret_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors through the kernels' interpreted copy (the op's CPU default is the PyTorch reference)."""
    monkeypatch.setattr(norm_mul, "INTERPRET_ON_CPU", True)


def _operands(n: int, d: int, dtype: torch.dtype, seed: int, device: str = "cpu", strided_u: bool = True):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d, generator=g, device=device).to(dtype).requires_grad_()
    wide = torch.randn(n, 3 * d, generator=g, device=device).to(dtype)
    u = (wide[:, d : 2 * d] if strided_u else wide[:, :d].contiguous()).detach().requires_grad_()
    w = (1 + 0.1 * torch.randn(d, generator=g, device=device)).requires_grad_()
    b = (0.1 * torch.randn(d, generator=g, device=device)).requires_grad_()
    return x, u, w, b


def _check(
    n: int, d: int, dtype: torch.dtype, seed: int, device: str = "cpu", rel: float = 1e-5, with_u: bool = True
) -> None:
    x, u, w, b = _operands(n, d, dtype, seed, device)
    if not with_u:  # the LayerNorm alone
        u = None
    y = layer_norm_mul(x, u, w, b, 1e-5)
    # The reference in float64 of the same (rounded) operands.
    inputs = [t for t in (x, u, w, b) if t is not None]
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    ref_u = leaves[1] if with_u else None
    want = reference_layer_norm_mul(leaves[0], ref_u, *leaves[-2:], 1e-5, torch.float64)
    assert y.dtype == dtype and y.shape == (n, d)
    scale = want.abs().max().item() if n else 1.0
    torch.testing.assert_close(y.double(), want, atol=rel * max(scale, 1.0), rtol=0)
    up = torch.randn(n, d, generator=torch.Generator(device=device).manual_seed(seed + 1), device=device)
    got = torch.autograd.grad(y, inputs, up.to(y.dtype))
    ref = torch.autograd.grad(want, leaves, up.double())
    names = ("dx", "du", "dweight", "dbias") if with_u else ("dx", "dweight", "dbias")
    for name, a, r in zip(names, got, ref, strict=True):
        assert a.shape == r.shape and a.dtype == (w.dtype if name in ("dweight", "dbias") else dtype)
        tol = rel * max(r.abs().max().item() if r.numel() else 1.0, 1.0) * (4 if name.startswith("dw") else 1)
        torch.testing.assert_close(a.double(), r, atol=tol, rtol=0, msg=lambda m, n_=name: f"{n_}: {m}")


@needs_triton
@settings(max_examples=20, deadline=None)
@given(n=st.integers(0, 9), d=st.integers(1, 40), seed=st.integers(0, 2**16), with_u=st.booleans())
def test_interpreted_kernels_match_the_reference_fp32(n: int, d: int, seed: int, with_u: bool) -> None:
    _check(n, d, torch.float32, seed, rel=2e-5 * max(n, 1), with_u=with_u)


@needs_triton
def test_interpreted_kernels_fp16() -> None:
    _check(7, 24, torch.float16, 3, rel=2e-3)
    _check(7, 24, torch.float16, 4, rel=2e-3, with_u=False)


def test_without_triton_the_op_runs_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(norm_mul, "_kernels", lambda device: None)
    _check(5, 12, torch.float32, 1, rel=1e-5)
    _check(5, 12, torch.float32, 2, rel=1e-5, with_u=False)


@needs_triton
def test_opcheck() -> None:
    x, u, w, b = _operands(6, 16, torch.float32, 0)
    torch.library.opcheck(norm_mul._layer_norm_mul_op, (x, u, w, b, 1e-5, torch.float32))
    y, mean, rstd = norm_mul._layer_norm_mul_op(x, u, w, b, 1e-5, torch.float32)
    saved = [t.detach() for t in (x, u, w, b, mean, rstd)]  # the backward op itself has no derivative
    torch.library.opcheck(norm_mul._layer_norm_mul_bwd_op, (torch.randn_like(y).detach(), *saved))
    torch.library.opcheck(norm_mul._layer_norm_mul_op, (x, None, w, b, 1e-5, torch.float32))
    saved[1] = None
    torch.library.opcheck(norm_mul._layer_norm_mul_bwd_op, (torch.randn_like(y).detach(), *saved))


@needs_triton
@pytest.mark.parametrize("with_u", [True, False])
def test_eager_calls_skip_the_op_dispatch_and_equal_it(with_u: bool) -> None:
    """Eager ``layer_norm_mul`` runs ``EagerLayerNormMul`` (no torch.library dispatch) under the op's profiler names,
    with the op's values and gradients."""
    x, u, w, b = _operands(6, 16, torch.float32, 0)
    u = u if with_u else None
    leaves = [t for t in (x, u, w, b) if t is not None]
    dy = torch.randn(6, 16)

    def run(fn) -> tuple[torch.Tensor, ...]:
        for t in leaves:
            t.grad = None
        y = fn()
        y.backward(dy)
        return (y.detach(), *(t.grad.clone() for t in leaves))

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        eager = run(lambda: layer_norm_mul(x, u, w, b))
    names = {e.name for e in prof.events()}
    assert {"gr_models::layer_norm_mul", "gr_models::layer_norm_mul_bwd"} <= names
    assert not any(n.startswith("GeneratedBackwardFor_gr_models") for n in names)
    through_the_op = run(lambda: norm_mul._layer_norm_mul_op(x, u, w, b, 1e-5, torch.float32)[0])
    for a, c in zip(eager, through_the_op, strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_autocast_gives_the_autocast_dtype_and_errors_name_the_problem() -> None:
    x, u, w, b = _operands(4, 8, torch.float32, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer_norm_mul(x, u, w, b).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="one \\[n, D\\] shape"):
        layer_norm_mul(x, u[:, :4], w, b)
    with pytest.raises(ValueError, match="weight and bias must be \\[8\\]"):
        layer_norm_mul(x, u, w[:4], b)
    with pytest.raises(TypeError, match="supports"):
        layer_norm_mul(x.double(), u, w, b)


@pytest.mark.parametrize("triton_kernels", [pytest.param(True, marks=needs_triton), False])
def test_fused_block_equals_the_eager_block(triton_kernels: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not triton_kernels:
        monkeypatch.setattr(norm_mul, "_kernels", lambda device: None)
    assert_fused_block_equals_unfused(1e-5, 1e-5, 1e-4, 1e-5, fused_norms=True)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compiled_kernels_match_the_reference(dtype: torch.dtype) -> None:
    rel = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    _check(4099, 512, dtype, 0, device="cuda", rel=rel)
    _check(33, 100, dtype, 1, device="cuda", rel=rel)
    _check(4099, 512, dtype, 2, device="cuda", rel=rel, with_u=False)


@pytest.mark.gpu
@needs_cuda
def test_compiled_fused_block_under_autocast_is_close_to_the_eager_block() -> None:
    assert_cuda_block_close_under_autocast({"fused_norms": False}, {"fused_norms": True})


def test_reference_equals_torch_layer_norm_times_u() -> None:
    x, u, w, b = _operands(5, 12, torch.float32, 2)
    want = u * F.layer_norm(x, (12,), w, b, 1e-5)
    torch.testing.assert_close(reference_layer_norm_mul(x, u, w, b, 1e-5), want)


@needs_triton
def test_fused_block_under_torch_compile() -> None:
    """The ops trace through their fake impls: a compiled fused block (aot_eager) gives the eager fused block's
    values and gradients."""
    cfg = HSTUConfig(
        embedding_dim=16, num_heads=2, max_seq_len=8, dropout=0.0, use_rab=False, attention_backend="reference",
        fused_norms=True,
    )  # fmt: skip
    torch.manual_seed(0)
    block = HSTUBlock(cfg)
    offsets = torch.tensor([0, 3, 8, 10])
    x = torch.randn(10, 16, requires_grad=True)
    torch._dynamo.reset()  # HSTUBlock.forward's code object may hold other tests' compiled entries (recompile limit)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (block, compiled):
        y = fn(x, offsets, 7, None, validate=False)
        results.append((y, torch.autograd.grad(y.square().sum(), [x, *block.parameters()])))
    torch._dynamo.reset()
    torch.testing.assert_close(results[1][0], results[0][0])
    for a, r in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(a, r)
