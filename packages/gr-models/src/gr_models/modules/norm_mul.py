"""``layer_norm_mul(x, u, weight, bias)``: ``u * LayerNorm(x)`` in one pass, the HSTU block's gating of the attention
output (``U * LayerNorm(attn)``), or with ``u=None`` the LayerNorm alone written in the dtype its consumer needs (the
block's input norm, which the U/V/Q/K projection reads in the autocast dtype); a ``torch.library`` custom op with
autograd and a fake impl, which compiled and exported code records; eager calls run the same bodies through
``EagerLayerNormMul`` and skip the op's Python dispatch.

Why: eagerly under bf16 autocast the gating is a LayerNorm run in fp32 (a fp32 ``[n, H*Dv]`` result), a multiply
by ``U`` (fp32 again) and the output projection's cast to bf16: three passes writing 2.5x the bytes of the result,
and their backward as many again. Here one kernel reads ``x`` and ``u`` and writes ``y`` in the autocast dtype (the
dtype the output projection casts to anyway: the same rounding, once); the backward reads ``dy``, ``x``, ``u`` once
and writes ``dx``, ``du`` and per-program partial sums of the weight and bias gradients.

CUDA tensors run ``norm_mul_kernels`` compiled (when Triton is installed); every other case runs the PyTorch
reference (``reference_layer_norm_mul``), so the op works on every device. Tests set ``INTERPRET_ON_CPU`` to run the
kernels' interpreted copy on CPU tensors.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

import gr_kernels
from gr_kernels.profiling import op_range
from gr_kernels.triton_interpreter import KernelModules
from gr_models.modules.triton_rows import (
    compute_dtype,
    device_scope,
    kernel_device,
    partial_sum_rows,
    unit_stride_rows,
    whole_row_tiles,
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_D = 8192  # one program holds whole rows
_INTERPRETED_NAME = "gr_models.modules._interpreted_norm_mul_kernels"
INTERPRET_ON_CPU = False  # CPU tensors through Triton's interpreter (tests; far slower than the reference)


def reference_layer_norm_mul(
    x: Tensor, u: Tensor | None, weight: Tensor, bias: Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> Tensor:
    """``u * layer_norm(x)`` with the statistics and the product in fp32 (float64 for float64 operands, the tests'
    reference), rounded once to ``out_dtype``."""
    u_dtype = x.dtype if u is None else u.dtype
    out_dtype = out_dtype or torch.promote_types(x.dtype, u_dtype)
    acc = torch.float64 if torch.float64 in (x.dtype, u_dtype) else torch.float32
    normed = F.layer_norm(x.to(acc), (x.shape[-1],), weight.to(acc), bias.to(acc), eps)
    return (normed if u is None else u.to(acc) * normed).to(out_dtype)


_KERNELS = KernelModules("gr_models.modules.norm_mul_kernels", _INTERPRETED_NAME)


def runs_fused(t: Tensor) -> bool:
    """Whether ``layer_norm_mul`` on tensors like ``t`` runs the fused kernels (CUDA; CPU only when the tests set
    ``INTERPRET_ON_CPU``; Triton installed either way is the kernels' own check). Elsewhere it runs the PyTorch
    reference, which a caller with an eager twin (the HSTU block's ``nn.LayerNorm``) can skip: it is only slower."""
    return kernel_device(t, INTERPRET_ON_CPU)


def _kernels(t: Tensor) -> ModuleType | None:
    """The kernels module for ``t``'s device; None: the PyTorch reference runs."""
    if not runs_fused(t) or not gr_kernels.triton_available():
        return None
    return _KERNELS.for_device(t.device)


@torch.library.custom_op("gr_models::layer_norm_mul", mutates_args=())
def _layer_norm_mul_op(
    x: Tensor, u: Tensor | None, weight: Tensor, bias: Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    return _forward_body(x, u, weight, bias, eps, out_dtype)


def _forward_body(
    x: Tensor, u: Tensor | None, weight: Tensor, bias: Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    n, d = x.shape
    kernels = _kernels(x)
    if kernels is None:  # no Triton: the reference, with the statistics the backward needs
        xf = x.float()
        mean = xf.mean(-1)
        rstd = torch.rsqrt(xf.var(-1, unbiased=False) + eps)
        return reference_layer_norm_mul(x, u, weight, bias, eps, out_dtype), mean, rstd
    x = unit_stride_rows(x)
    u = None if u is None else unit_stride_rows(u)
    y = torch.empty((n, d), dtype=out_dtype, device=x.device)
    mean = torch.empty(n, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    if n:
        block_rows, block_d = whole_row_tiles(d, x.device)
        grid = (-(-n // block_rows),)
        with device_scope(x):
            kernels.layer_norm_mul_fwd_kernel[grid](
                x, x if u is None else u, weight, bias, y, mean, rstd, n, x.stride(0),
                0 if u is None else u.stride(0), y.stride(0), eps,
                D=d, BLOCK_ROWS=block_rows, BLOCK_D=block_d, HAS_U=u is not None,
            )  # fmt: skip
    return y, mean, rstd


@_layer_norm_mul_op.register_fake
def _(x: Tensor, u: Tensor | None, weight: Tensor, bias: Tensor, eps: float, out_dtype: torch.dtype):
    n = x.shape[0]
    return (
        x.new_empty(x.shape, dtype=out_dtype),
        x.new_empty((n,), dtype=torch.float32),
        x.new_empty((n,), dtype=torch.float32),
    )


@torch.library.custom_op("gr_models::layer_norm_mul_bwd", mutates_args=())
def _layer_norm_mul_bwd_op(
    dy: Tensor, x: Tensor, u: Tensor | None, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, du, dweight, dbias)``; ``du`` is empty (``[0]``) without ``u``."""
    dx, du, dw, db = _backward_body(dy, x, u, weight, bias, mean, rstd)
    # The body's dweight and dbias can be views of one buffer; a custom op's outputs must not alias each other.
    return dx, du, dw.clone(), db.clone()


def _backward_body(
    dy: Tensor,
    x: Tensor,
    u: Tensor | None,
    weight: Tensor,
    bias: Tensor,
    mean: Tensor,
    rstd: Tensor,
    dres: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op's backward; ``dres`` (``layer_norm_residual``): a gradient of ``x`` from its other use, added into dx."""
    n, d = x.shape
    kernels = _kernels(x)
    if kernels is None:
        dx, du, dw, db = _reference_bwd(dy, x, u, weight, bias, mean, rstd)
        return (dx if dres is None else (dx.float() + dres.float()).to(x.dtype)), du, dw, db
    dy, x = unit_stride_rows(dy), unit_stride_rows(x)
    u = None if u is None else unit_stride_rows(u)
    dres = None if dres is None else unit_stride_rows(dres)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    du = x.new_empty(0) if u is None else torch.empty_like(u, memory_format=torch.contiguous_format)
    block_rows, block_d = whole_row_tiles(d, x.device)
    num_warps, min_programs = 4, 256
    if u is not None and x.device.type == "cuda":
        # The gating backward streams five 16-bit [n, d] tensors: steps of ~1k elements on 8 warps keep more loads in
        # flight per SM. The input norm keeps 4k-element steps on 4 warps, 32 steps a program. H200, n = 65536,
        # d = 512 (`python tools/bench_residual_norm.py`): 153.8 -> 125.7 us and 129.0 -> 121.2 us.
        block_rows, num_warps, min_programs = max(1, 1024 // block_d), 8, 1024
    rows_per_program = partial_sum_rows(n, block_rows, x.device, min_programs)
    programs = -(-n // rows_per_program)
    # dweight's and dbias' per-program partial rows in one buffer: one reduction adds both up.
    partials = torch.empty((2, programs, d), dtype=torch.float32, device=x.device)
    dw_part, db_part = partials[0], partials[1]
    if n:
        with device_scope(x):
            kernels.layer_norm_mul_bwd_kernel[(programs,)](
                dy, x, x if u is None else u, weight, bias, mean, rstd, dx if dres is None else dres, dx,
                dx if u is None else du, dw_part, db_part, n, dy.stride(0), x.stride(0),
                0 if u is None else u.stride(0), 0 if dres is None else dres.stride(0), dx.stride(0),
                0 if u is None else du.stride(0),
                D=d, BLOCK_ROWS=block_rows, BLOCK_D=block_d, ROWS_PER_PROGRAM=rows_per_program,
                HAS_U=u is not None, HAS_RES=dres is not None, num_warps=num_warps,
            )  # fmt: skip
    dw, db = partials.sum(1)
    return dx, du, dw.to(weight.dtype), db.to(bias.dtype)


@_layer_norm_mul_bwd_op.register_fake
def _(dy: Tensor, x: Tensor, u: Tensor | None, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor):
    du = x.new_empty(0) if u is None else torch.empty_like(u)
    return torch.empty_like(x), du, torch.empty_like(weight), torch.empty_like(bias)


def _reference_bwd(dy, x, u, weight, bias, mean, rstd):
    xhat = (x.float() - mean[:, None]) * rstd[:, None]
    dyf = dy.float()
    du = x.new_empty(0) if u is None else (dyf * (xhat * weight.float() + bias.float())).to(u.dtype)
    g = dyf if u is None else dyf * u.float()
    gw = g * weight.float()
    d = x.shape[-1]
    dx = (gw - xhat * (gw * xhat).sum(-1, keepdim=True) / d - gw.sum(-1, keepdim=True) / d) * rstd[:, None]
    dw = (g * xhat).sum(0)
    db = g.sum(0)
    return dx.to(x.dtype), du, dw.to(weight.dtype), db.to(bias.dtype)


def _setup_context(ctx, inputs, output) -> None:
    x, u, weight, bias, _eps, _out_dtype = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, u, weight, bias, mean, rstd)


def _input_grads(ctx, dy: Tensor, backward) -> tuple[Tensor | None, ...]:
    """The gradients of ``(x, u, weight, bias, eps, out_dtype)`` from the saved tensors, by ``backward`` (the
    backward op, or its body in eager calls)."""
    x, u, weight, bias, mean, rstd = ctx.saved_tensors
    dx, du, dw, db = backward(dy, x, u, weight, bias, mean, rstd)
    return dx, None if u is None else du, dw, db, None, None


def _backward(ctx, dy, _dmean, _drstd):
    return _input_grads(ctx, dy, _layer_norm_mul_bwd_op)


_layer_norm_mul_op.register_autograd(_backward, setup_context=_setup_context)


class EagerLayerNormMul(torch.autograd.Function):
    """The op and its autograd formula without the ``torch.library`` dispatch, for eager calls: that dispatch and
    the op's Python autograd wrapper cost more host time than the kernels take on the GPU (gr_kernels.ops says more).
    Profiler ranges keep the op names."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, u: Tensor | None, weight: Tensor, bias: Tensor, eps: float, out_dtype: torch.dtype
    ) -> Tensor:
        with op_range("gr_models::layer_norm_mul"):
            y, mean, rstd = _forward_body(x, u, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x, u, weight, bias, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        with op_range("gr_models::layer_norm_mul_bwd"):
            return _input_grads(ctx, dy, _backward_body)


class EagerLayerNormResidual(torch.autograd.Function):
    """``(LayerNorm(x), x)`` for eager calls (``layer_norm_residual``): the second output is ``x`` itself (autograd
    hands back a view), and the gradient its user sends back arrives here with the norm's, to be added inside the
    backward kernel. Profiler ranges: the op names of ``layer_norm_mul``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float, out_dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        with op_range("gr_models::layer_norm_mul"):
            y, mean, rstd = _forward_body(x, None, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return y, x

    @staticmethod
    def backward(ctx, dy: Tensor | None, dres: Tensor | None):  # type: ignore[override]
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if dy is None:  # the normalised output was not used: x's gradient is the residual's alone
            return dres, None, None, None, None
        with op_range("gr_models::layer_norm_mul_bwd"):
            dx, _, dw, db = _backward_body(dy, x, None, weight, bias, mean, rstd, dres)
        return dx, dw, db, None, None


def _checked_out_dtype(
    x: Tensor, u: Tensor | None, weight: Tensor, bias: Tensor, out_dtype: torch.dtype | None
) -> torch.dtype:
    """The output dtype of ``layer_norm_mul(x, u, weight, bias, out_dtype=out_dtype)``, after checking the operands."""
    if x.dim() != 2 or (u is not None and u.shape != x.shape):
        got = "None" if u is None else tuple(u.shape)
        raise ValueError(f"layer_norm_mul needs x and u of one [n, D] shape, got {tuple(x.shape)} and {got}")
    d = x.shape[1]
    if weight.shape != (d,) or bias.shape != (d,):
        raise ValueError(f"weight and bias must be [{d}], got {tuple(weight.shape)} and {tuple(bias.shape)}")
    if d > MAX_D:
        raise ValueError(f"layer_norm_mul handles rows of at most {MAX_D} elements, got {d}")
    u_dtype = x.dtype if u is None else u.dtype
    if x.dtype not in SUPPORTED_DTYPES or u_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"layer_norm_mul supports {SUPPORTED_DTYPES}, got x {x.dtype} and u {u_dtype}")
    if not (x.device == weight.device == bias.device and (u is None or u.device == x.device)):
        raise ValueError("layer_norm_mul tensors must share a device")
    return compute_dtype(x, x.dtype, u_dtype) if out_dtype is None else out_dtype


def layer_norm_mul(
    x: Tensor,
    u: Tensor | None,
    weight: Tensor,
    bias: Tensor,
    eps: float = 1e-5,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """``u * LayerNorm(x; weight, bias, eps)`` over the last dim of ``x`` / ``u`` (``[n, D]``, rows may be strided,
    e.g. a column slice of a projection), fp32 inside; ``u=None``: the LayerNorm alone. ``out_dtype``: under autocast
    on their device the autocast dtype (what a following ``nn.Linear`` casts to), else the promoted dtype of ``x``
    and ``u``."""
    out_dtype = _checked_out_dtype(x, u, weight, bias, out_dtype)
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return _layer_norm_mul_op(x, u, weight, bias, float(eps), out_dtype)[0]
    return EagerLayerNormMul.apply(x, u, weight, bias, float(eps), out_dtype)


def layer_norm_residual(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5, out_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """``(LayerNorm(x), x)``: the norm (as ``layer_norm_mul(x, None, ...)``) and ``x`` for its other use, e.g. the
    HSTU block's residual. Eagerly, the gradient that other use sends back is added to the norm's input gradient
    inside the backward kernel, where autograd would add the two ``[n, D]`` gradients in a pass of its own. Compiled
    and exported code get ``(layer_norm_mul(x, None, ...), x)``."""
    out_dtype = _checked_out_dtype(x, None, weight, bias, out_dtype)
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return _layer_norm_mul_op(x, None, weight, bias, float(eps), out_dtype)[0], x
    return EagerLayerNormResidual.apply(x, weight, bias, float(eps), out_dtype)
