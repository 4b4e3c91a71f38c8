"""Triton kernels of ``l2_normalize`` (launched by ``l2_norm``): ``y = x / max(||x||, eps)`` over rows of ``D``
columns, the norm in fp32, and its backward ``dx = (dy - [||x|| >= eps] * y * sum(dy * y)) / max(||x||, eps)``.

One program handles ``BLOCK_ROWS`` rows whole (``BLOCK_D`` >= D, a power of two), so each row is read once per pass.
Loaded twice by ``l2_norm`` (compiled for CUDA tensors, interpreted for CPU ones): no module-level state, and only
builtins of ``triton.language`` (``tl.reduce``; see ``norm_mul_kernels``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


@triton.jit(do_not_specialize=["num_rows"])  # one compile for every row count
def l2_normalize_fwd_kernel(
    x_ptr, y_ptr, norm_ptr, num_rows, stride_x, stride_y, eps,
    D: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    live = rows < num_rows
    mask = live[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.reduce(x * x, 1, _add))
    rinv = 1.0 / tl.maximum(norm, eps)
    y = x * rinv[:, None]
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(norm_ptr + rows, norm, mask=live)


@triton.jit(do_not_specialize=["num_rows"])  # one compile for every row count
def l2_normalize_bwd_kernel(
    dy_ptr, y_ptr, norm_ptr, dx_ptr, num_rows, stride_dy, stride_y, stride_dx, eps,
    D: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    live = rows < num_rows
    mask = live[:, None] & (cols < D)[None, :]
    dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    norm = tl.load(norm_ptr + rows, mask=live, other=1.0)
    rinv = 1.0 / tl.maximum(norm, eps)
    # A norm clamped to eps is a constant denominator: no projection term (F.normalize's clamp_min passes norm >= eps).
    dot = tl.where(norm >= eps, tl.reduce(dy * y, 1, _add), 0.0)
    dx = (dy - y * dot[:, None]) * rinv[:, None]
    tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
