"""``linear_silu_split(x, weight, bias, sizes)``: ``silu(x @ weight.T + bias).split(sizes, -1)``, the HSTU block's
U/V/Q/K projection, with a fused backward.

Why: eagerly, autograd's backward of ``split`` concatenates the four pieces' gradients into one ``[n, W]`` tensor,
the SiLU's backward reads it with the pre-activation and writes its gradient, and the linear's backward reduces that
once more for the bias gradient: three passes over ``[n, W]`` (on an H200 training step, 8 blocks of W = 2048 over
65k tokens: 1.4 ms of concatenation, 1.7 ms of SiLU backward and ~0.9 ms of bias reduction). Here one Triton kernel
reads the four gradients where they are and the pre-activation, and writes the pre-activation's gradient together
with per-program partial sums of the bias gradient; the two matrix products stay cuBLAS's.

The forward is the eager one (one ``addmm`` with the bias in its epilogue, one SiLU), run in the autocast dtype when
autocast is on for the input's device (as ``nn.Linear`` under autocast: operands cast to it, gradients returned in
the parameters' dtypes), and saves what the eager form saves (input, weight in the compute dtype, pre-activation).
The fused backward runs on CUDA tensors (Triton); ``fuses`` says when. Other devices, compiled code (Inductor
fuses the eager form itself) and exported programs take the eager form. Tests set ``INTERPRET_ON_CPU`` to run the
kernel's interpreted copy on CPU tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

import gr_kernels
from gr_kernels.profiling import op_range
from gr_kernels.triton_interpreter import KernelModules
from gr_models.modules.triton_rows import compute_dtype, device_scope, kernel_device, unit_stride_rows

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRET_ON_CPU = False  # CPU tensors through Triton's interpreter (tests; far slower than the eager form)
_KERNELS = KernelModules("gr_models.modules.silu_projection_kernels", "gr_models.modules._interpreted_silu_projection")


def fuses(x: Tensor, weight: Tensor) -> bool:
    """Whether ``linear_silu_split(x, weight, ...)`` runs the fused backward: eagerly (not while compiling or
    exporting), on CUDA with Triton (CPU only when the tests set ``INTERPRET_ON_CPU``), in a supported compute dtype.
    Elsewhere it is the eager form."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    on_device = kernel_device(x, INTERPRET_ON_CPU) and gr_kernels.triton_available()
    return on_device and compute_dtype(x, x.dtype, weight.dtype) in SUPPORTED_DTYPES


def eager_linear_silu_split(x: Tensor, weight: Tensor, bias: Tensor | None, sizes: Sequence[int]) -> tuple[Tensor, ...]:
    """The plain PyTorch form (autograd's own backward)."""
    return tuple(F.silu(F.linear(x, weight, bias)).split(list(sizes), dim=-1))


def linear_silu_split(x: Tensor, weight: Tensor, bias: Tensor, sizes: Sequence[int]) -> tuple[Tensor, ...]:
    """``silu(x @ weight.T + bias)`` (``x [n, K]``, ``weight [W, K]``, ``bias [W]``) split along its columns into
    pieces of ``sizes`` (four pieces summing to ``W``; views of one ``[n, W]`` result). Fused backward where
    ``fuses(x, weight)``; else the eager form."""
    sizes = tuple(int(s) for s in sizes)
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_silu_split needs x [n, K] and weight [W, K], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if len(sizes) != 4 or min(sizes) <= 0 or sum(sizes) != weight.shape[0]:
        raise ValueError(f"sizes must be four positive widths summing to {weight.shape[0]}, got {list(sizes)}")
    if not fuses(x, weight):
        return eager_linear_silu_split(x, weight, bias, sizes)
    return LinearSiluSplit.apply(x, weight, bias, sizes, compute_dtype(x, x.dtype, weight.dtype))


def _tiles(widths: Sequence[int], device: torch.device) -> dict[str, int | bool]:  # constexprs and num_warps
    """The kernel's tile: on the GPU 256 rows x up to 128 columns per program in 8-row steps, the widest column
    block that divides every piece (``ONE_PIECE``: one gradient pointer per program), else 128 columns picked by
    mask (the fastest of 72 tiles timed on an H200 at [65k, 4 x 512] in bf16); in the interpreter 4 rows in 2-row
    steps over 8 columns, so small tests span several programs, steps and tails."""
    if device.type != "cuda":
        one_piece = all(w % 8 == 0 for w in widths)
        return {"ROWS_PER_PROGRAM": 4, "BLOCK_M": 2, "BLOCK_N": 8, "ONE_PIECE": one_piece, "num_warps": 1}
    block_n = next((b for b in (128, 64, 32) if all(w % b == 0 for w in widths)), 0)
    return {"ROWS_PER_PROGRAM": 256, "BLOCK_M": 8, "BLOCK_N": block_n or 128, "ONE_PIECE": block_n > 0, "num_warps": 4}


def silu_split_backward(grads: Sequence[Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
    """``(dy, dbias)``: the gradient of the pre-activation ``y [n, W]`` (``y``'s dtype) from the pieces' gradients
    (``[n, w_i]``, rows may be strided), and its column sums in fp32."""
    kernels: ModuleType = _KERNELS.for_device(y.device)
    n, width = y.shape
    grads = [unit_stride_rows(g) for g in grads]
    bounds = [0]
    for g in grads:
        bounds.append(bounds[-1] + g.shape[1])
    tiles = _tiles([g.shape[1] for g in grads], y.device)
    programs = (-(-n // int(tiles["ROWS_PER_PROGRAM"])), -(-width // int(tiles["BLOCK_N"])))
    dy = torch.empty((n, width), dtype=y.dtype, device=y.device)
    db_part = torch.empty((programs[0], width), dtype=torch.float32, device=y.device)
    if n:
        with device_scope(y):
            kernels.silu_split_bwd_kernel[programs](
                *grads, y, dy, db_part, n, *(g.stride(0) for g in grads), y.stride(0), dy.stride(0),
                W=width, C1=bounds[1], C2=bounds[2], C3=bounds[3], **tiles,
            )  # fmt: skip
    return dy, db_part.sum(0)


class LinearSiluSplit(torch.autograd.Function):
    """The projection with its fused backward (``linear_silu_split``); runs under the profiler name
    ``gr_models::linear_silu_split`` (and ``..._bwd``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, weight: Tensor, bias: Tensor, sizes: tuple[int, ...], dtype: torch.dtype
    ) -> tuple[Tensor, ...]:
        name = "gr_models::linear_silu_split"
        with op_range(name), torch.autocast(x.device.type, enabled=False):
            xc, wc = x.to(dtype), weight.to(dtype)
            y = torch.addmm(bias.to(dtype), xc, wc.t())
            out = F.silu(y)
        ctx.save_for_backward(xc, wc, y)
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        return tuple(out.split(list(sizes), dim=-1))

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        xc, wc, y = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        with op_range("gr_models::linear_silu_split_bwd"):
            dy, db = silu_split_backward([g.to(y.dtype) for g in grads], y)
            dx = (dy @ wc).to(x_dtype) if ctx.needs_input_grad[0] else None
            dw = (dy.t() @ xc).to(w_dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, db.to(b_dtype) if ctx.needs_input_grad[2] else None, None, None
