"""``residual_linear(x, y, weight, bias)``: ``x + y @ weight.T + bias``, the HSTU block's output projection and residual
add, with one Triton pass on each side of the matmuls.

Why: eagerly under bf16 autocast the projection ends in bf16 (bias in cuBLAS's epilogue) and the residual stream ``x``
is fp32, so the add mixes dtypes and runs PyTorch's non-vectorised elementwise kernel (on an H200 training step, 8
blocks over 65k tokens of width 512: 1.0 ms a step, ~1.7x what its bytes need); its backward casts the fp32 output
gradient to bf16 in one pass and sums it over the rows for the bias gradient in another (0.9 ms). Here the forward is
one matmul without bias and one Triton pass ``x + m + b`` (fp32 inside, written in ``x``'s promoted dtype), and the
backward one Triton pass that writes the cast gradient with per-program partial bias sums; the two matmuls of the
backward stay cuBLAS's. ``x``'s gradient is the output gradient itself (no copy).

Operands follow ``nn.Linear`` under autocast: ``y`` and ``weight`` in the autocast dtype when autocast is on for
their device, gradients returned in the parameters' dtypes. The fused form runs on CUDA tensors with Triton
(``fuses``); other devices, compiled code (Inductor fuses the eager form itself) and exported programs take the eager
form ``x + F.linear(y, weight, bias)``. Tests set ``INTERPRET_ON_CPU`` to run the kernels' interpreted copy on CPU.
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
MAX_D = 8192  # a program holds whole rows
INTERPRET_ON_CPU = False  # CPU tensors through Triton's interpreter (tests; far slower than the eager form)
_KERNELS = KernelModules(
    "gr_models.modules.residual_linear_kernels", "gr_models.modules._interpreted_residual_linear_kernels"
)


def fuses(x: Tensor, y: Tensor, weight: Tensor) -> bool:
    """Whether ``residual_linear(x, y, weight, ...)`` runs the fused passes: eagerly (not while compiling or exporting),
    on CUDA with Triton (CPU only when the tests set ``INTERPRET_ON_CPU``), dtypes and width supported."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    if not (kernel_device(x, INTERPRET_ON_CPU) and gr_kernels.triton_available()):
        return False
    dtypes = (x.dtype, compute_dtype(y, y.dtype, weight.dtype))
    return all(d in SUPPORTED_DTYPES for d in dtypes) and weight.shape[0] <= MAX_D


def eager_residual_linear(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """The plain PyTorch form (autograd's own backward)."""
    return x + F.linear(y, weight, bias)


def residual_linear(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``x + y @ weight.T + bias`` (``x [n, D_out]``, ``y [n, D_in]``, ``weight [D_out, D_in]``, ``bias [D_out]``),
    in the promoted dtype of ``x`` and the matmul's. Fused passes where ``fuses(x, y, weight)``; else the eager form."""
    if y.dim() != 2 or weight.dim() != 2 or y.shape[1] != weight.shape[1]:
        raise ValueError(
            f"residual_linear needs y [n, D_in] and weight [D_out, D_in], got {tuple(y.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if x.shape != (y.shape[0], weight.shape[0]):
        raise ValueError(f"residual x must be [{y.shape[0]}, {weight.shape[0]}], got {tuple(x.shape)}")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if not (x.device == y.device == weight.device == bias.device):
        raise ValueError("residual_linear tensors must share a device")
    if not fuses(x, y, weight):
        return eager_residual_linear(x, y, weight, bias)
    return ResidualLinear.apply(x, y, weight, bias, compute_dtype(y, y.dtype, weight.dtype))


def _kernels(t: Tensor) -> ModuleType:
    return _KERNELS.for_device(t.device)


def residual_add(x: Tensor, m: Tensor, bias: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``x + m + bias`` (``[n, D]``, ``[n, D]``, ``[D]``) summed in fp32, written in ``out_dtype``."""
    n, d = x.shape
    x, m = unit_stride_rows(x), unit_stride_rows(m)
    out = torch.empty((n, d), dtype=out_dtype, device=x.device)
    if n:
        block_rows, block_d = whole_row_tiles(d, x.device)
        with device_scope(x):
            _kernels(x).residual_add_kernel[(-(-n // block_rows),)](
                x, m, bias, out, n, x.stride(0), m.stride(0), out.stride(0),
                D=d, BLOCK_ROWS=block_rows, BLOCK_D=block_d,
            )  # fmt: skip
    return out


def cast_column_sums(g: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(g.to(dtype), g.sum(0) in fp32)`` in one pass over ``g [n, D]`` (the sums added in a fixed order)."""
    n, d = g.shape
    g = unit_stride_rows(g)
    gc = torch.empty((n, d), dtype=dtype, device=g.device)
    block_rows, block_d = whole_row_tiles(d, g.device)
    rows_per_program = partial_sum_rows(n, block_rows, g.device)
    programs = -(-n // rows_per_program)
    part = torch.empty((programs, d), dtype=torch.float32, device=g.device)
    if n:
        with device_scope(g):
            _kernels(g).cast_column_sums_kernel[(programs,)](
                g, gc, part, n, g.stride(0), gc.stride(0),
                D=d, BLOCK_ROWS=block_rows, BLOCK_D=block_d, ROWS_PER_PROGRAM=rows_per_program,
            )  # fmt: skip
    return gc, part.sum(0)


class ResidualLinear(torch.autograd.Function):
    """The fused form (``residual_linear``); runs under the profiler names ``gr_models::residual_linear`` and
    ``gr_models::residual_linear_bwd``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, dtype: torch.dtype
    ) -> Tensor:
        with op_range("gr_models::residual_linear"), torch.autocast(x.device.type, enabled=False):
            yc, wc = y.to(dtype), weight.to(dtype)
            out = residual_add(x, yc @ wc.t(), bias, torch.promote_types(x.dtype, dtype))
        ctx.save_for_backward(yc, wc)
        ctx.dtypes = (x.dtype, y.dtype, weight.dtype, bias.dtype)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        yc, wc = ctx.saved_tensors
        x_dtype, y_dtype, w_dtype, b_dtype = ctx.dtypes
        with op_range("gr_models::residual_linear_bwd"):
            gc, db = cast_column_sums(g, yc.dtype)
            dy = (gc @ wc).to(y_dtype) if ctx.needs_input_grad[1] else None
            dw = (gc.t() @ yc).to(w_dtype) if ctx.needs_input_grad[2] else None
        dx = g.to(x_dtype) if ctx.needs_input_grad[0] else None
        return dx, dy, dw, db.to(b_dtype) if ctx.needs_input_grad[3] else None, None
