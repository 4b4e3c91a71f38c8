"""``gr_models.modules.residual_linear`` (``x + y @ W^T + b``, the HSTU block's output projection and residual) and
``norm_mul.layer_norm_residual`` (the input norm that takes the residual's gradient into its backward kernel).

- CPU: the Triton kernels in the interpreter (``INTERPRET_ON_CPU``: 2-row steps, so small shapes span several
  programs, loop steps and row tails), fp32 against a float64 reference with hypothesis shapes, fp16, bf16 autocast
  dtypes, the eager fallback, errors; ``layer_norm_residual`` against ``(LayerNorm(x), x)`` with both outputs used,
  with the kernels and without Triton; the HSTU block with ``fused_residual`` (and ``fused_norms``) against the eager
  block.
- GPU (``-m gpu``): the compiled kernels at the training step's width under bf16 autocast, and the fused block.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gr_models.modules import norm_mul, residual_linear
from gr_models.modules.hstu import HSTUBlock, HSTUConfig
from gr_models.modules.norm_mul import layer_norm_residual
from gr_models.modules.residual_linear import cast_column_sums, eager_residual_linear
from tests.gr_models.block_parity import assert_cuda_block_close_under_autocast, assert_fused_block_equals_unfused
from tests.gr_models.triton_marks import needs_cuda, needs_triton


@pytest.fixture(autouse=True)
def interpret_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors through the kernels' interpreted copies (the CPU default is the eager form)."""
    monkeypatch.setattr(residual_linear, "INTERPRET_ON_CPU", True)
    monkeypatch.setattr(norm_mul, "INTERPRET_ON_CPU", True)


def _operands(n: int, d_in: int, d_out: int, seed: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d_out, generator=g, device=device).to(dtype).requires_grad_()
    y = torch.randn(n, d_in, generator=g, device=device).to(dtype).requires_grad_()
    w = (torch.randn(d_out, d_in, generator=g, device=device) / d_in**0.5).requires_grad_()
    b = torch.randn(d_out, generator=g, device=device).requires_grad_()
    up = torch.randn(n, d_out, generator=g, device=device)
    return x, y, w, b, up


def _check(n: int, d_in: int, d_out: int, seed: int, rel: float, dtype: torch.dtype = torch.float32) -> None:
    x, y, w, b, up = _operands(n, d_in, d_out, seed, dtype=dtype)
    out = residual_linear.residual_linear(x, y, w, b)
    leaves = [t.detach().double().requires_grad_() for t in (x, y, w, b)]
    want = eager_residual_linear(*leaves)
    assert out.dtype == torch.promote_types(dtype, torch.float32) and out.shape == (n, d_out)
    scale = max(want.abs().max().item() if n else 1.0, 1.0)
    torch.testing.assert_close(out.double(), want, atol=rel * scale, rtol=0)
    got = torch.autograd.grad(out, (x, y, w, b), up.to(out.dtype))
    ref = torch.autograd.grad(want, leaves, up.double())
    for name, a, r, leaf in zip(("dx", "dy", "dweight", "dbias"), got, ref, (x, y, w, b), strict=True):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, name
        tol = rel * max(r.abs().max().item() if r.numel() else 1.0, 1.0)
        torch.testing.assert_close(a.double(), r, atol=tol, rtol=0, msg=lambda m, n_=name: f"{n_}: {m}")


@needs_triton
@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(0, 11), d_in=st.integers(1, 24), d_out=st.integers(1, 40), seed=st.integers(0, 2**16)
)  # fmt: skip
def test_interpreted_kernels_match_the_reference_fp32(n: int, d_in: int, d_out: int, seed: int) -> None:
    _check(n, d_in, d_out, seed, rel=2e-5 * max(n, d_in, 1))


@needs_triton
def test_interpreted_kernels_fp16_operands() -> None:
    # fp16 y, x and fp32 weights: the matmul in fp32 (their promotion), the sum in fp32, x's gradient in fp16.
    _check(9, 12, 20, 3, rel=2e-3, dtype=torch.float16)


@needs_triton
@settings(max_examples=15, deadline=None)
@given(n=st.integers(0, 13), d=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_cast_column_sums_is_the_cast_and_the_row_sum(n: int, d: int, seed: int) -> None:
    g = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    gc, sums = cast_column_sums(g, torch.float16)
    assert gc.dtype == torch.float16 and torch.equal(gc, g.to(torch.float16))
    assert sums.dtype == torch.float32
    torch.testing.assert_close(sums, g.sum(0), atol=1e-5 * max(n, 1), rtol=1e-6)


@needs_triton
def test_autocast_dtypes_follow_nn_linear() -> None:
    """Under bf16 autocast the matmul runs in bf16 and the fp32 residual keeps the output in fp32; gradients come back
    in the leaves' dtypes, close to the eager form's."""
    x, y, w, b, up = _operands(10, 16, 24, 0)
    results = []
    for fn in (residual_linear.residual_linear, eager_residual_linear):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(x, y, w, b)
        results.append((out, torch.autograd.grad(out, (x, y, w, b), up)))
    (out, grads), (want, want_grads) = results
    assert out.dtype == want.dtype == torch.float32
    torch.testing.assert_close(out, want, atol=3e-2, rtol=1e-2)
    for a, r, leaf in zip(grads, want_grads, (x, y, w, b), strict=True):
        assert a.dtype == leaf.dtype
        torch.testing.assert_close(a, r, atol=5e-2 * max(r.abs().max().item(), 1.0), rtol=0)


def test_without_the_kernels_it_is_the_eager_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(residual_linear, "INTERPRET_ON_CPU", False)
    x, y, w, b, _ = _operands(4, 6, 8, 1)
    assert not residual_linear.fuses(x, y, w)
    out = residual_linear.residual_linear(x, y, w, b)
    assert out.grad_fn is not None and "ResidualLinear" not in type(out.grad_fn).__name__
    torch.testing.assert_close(out, x + F.linear(y, w, b))


def test_errors_name_the_problem() -> None:
    x, y, w, b, _ = _operands(4, 6, 8, 1)
    with pytest.raises(ValueError, match="y \\[n, D_in\\] and weight \\[D_out, D_in\\]"):
        residual_linear.residual_linear(x, y[:, :5], w, b)
    with pytest.raises(ValueError, match="residual x must be \\[4, 8\\]"):
        residual_linear.residual_linear(x[:3], y, w, b)
    with pytest.raises(ValueError, match="bias must be \\[8\\]"):
        residual_linear.residual_linear(x, y, w, b[:7])


@pytest.mark.parametrize("triton_kernels", [pytest.param(True, marks=needs_triton), False])
@pytest.mark.parametrize("use_normed", [True, False])
def test_layer_norm_residual_takes_the_residual_gradient(
    triton_kernels: bool, use_normed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``(LayerNorm(x), x)`` with a loss on both outputs: x's gradient is the norm's plus the residual's (added in the
    backward kernel, or by the reference path without Triton); with the norm unused, the residual's alone."""
    if not triton_kernels:
        monkeypatch.setattr(norm_mul, "_kernels", lambda device: None)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 12, generator=gen, requires_grad=True)
    w = (1 + 0.1 * torch.randn(12, generator=gen)).requires_grad_()
    b = (0.1 * torch.randn(12, generator=gen)).requires_grad_()
    up_n, up_r = torch.randn(7, 12, generator=gen), torch.randn(7, 12, generator=gen)
    results = []
    for fused in (True, False):
        normed, residual = layer_norm_residual(x, w, b, 1e-5) if fused else (F.layer_norm(x, (12,), w, b, 1e-5), x)
        if fused:
            assert residual._base is x or residual is x  # x itself (a view autograd makes), not a copy
        loss = (residual * up_r).sum() + ((normed * up_n).sum() if use_normed else 0.0)
        leaves = (x, w, b) if use_normed else (x,)
        results.append(torch.autograd.grad(loss, leaves))
    for a, r in zip(*results, strict=True):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


@needs_triton
def test_fused_block_equals_the_eager_block() -> None:
    assert_fused_block_equals_unfused(1e-5, 1e-5, 1e-4, 1e-5, fused_residual=True)
    assert_fused_block_equals_unfused(1e-5, 1e-5, 1e-4, 1e-5, fused_residual=True, fused_norms=True)


@needs_triton
def test_dropout_in_training_keeps_the_eager_form() -> None:
    cfg = HSTUConfig(embedding_dim=16, num_heads=2, max_seq_len=8, dropout=0.5, use_rab=False,
                     attention_backend="reference")  # fmt: skip
    block = HSTUBlock(cfg).train()
    x = torch.randn(10, 16, requires_grad=True)
    y = torch.randn(10, 16)
    out = block.finish(x, torch.ones(10, 16), y.view(10, 2, 8))
    assert "ResidualLinear" not in type(out.grad_fn).__name__
    block.eval()
    out = block.finish(x, torch.ones(10, 16), y.view(10, 2, 8))
    assert "ResidualLinear" in type(out.grad_fn).__name__


@pytest.mark.gpu
@needs_cuda
def test_compiled_kernels_under_autocast() -> None:
    x, y, w, b, up = _operands(4099, 512, 512, 0, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = residual_linear.residual_linear(x, y, w, b)
    assert out.dtype == torch.float32
    leaves = [t.detach().double().requires_grad_() for t in (x, y, w, b)]
    want = eager_residual_linear(*leaves)
    torch.testing.assert_close(out.double(), want, atol=0.05, rtol=0.02)
    got = torch.autograd.grad(out, (x, y, w, b), up)
    ref = torch.autograd.grad(want, leaves, up.double())
    for a, r in zip(got, ref, strict=True):
        assert (a.double() - r).abs().max() <= 2e-2 * max(r.abs().max().item(), 1.0)


@pytest.mark.gpu
@needs_cuda
def test_fused_block_under_autocast_is_close_to_the_eager_block() -> None:
    assert_cuda_block_close_under_autocast({"fused_residual": False}, {"fused_residual": True})
