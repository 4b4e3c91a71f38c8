"""Triton kernels of ``layer_norm_mul`` (launched by ``norm_mul``): ``y = u * LayerNorm(x)`` (``HAS_U``; else
``y = LayerNorm(x)``) over rows of ``D`` columns, statistics and products in fp32, and its backward (dx, du, and
per-program partial sums of dweight/dbias; ``HAS_RES``: plus a gradient of ``x`` from elsewhere, added into dx).

A program handles rows whole (``BLOCK_D`` >= D, a power of two), ``BLOCK_ROWS`` at a time, so each row is read once per
pass; the backward's programs walk ``ROWS_PER_PROGRAM`` rows each and write one partial row of dweight / dbias.
Loaded twice by ``norm_mul`` (compiled for CUDA tensors, interpreted for CPU ones): no module-level state, and only
builtins of ``triton.language`` (``tl.full``, ``tl.reduce``; see ``gathered_logits_kernels``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


@triton.jit(do_not_specialize=["num_rows"])  # one compile for every row count
def layer_norm_mul_fwd_kernel(
    x_ptr, u_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, num_rows, stride_x, stride_u, stride_y, eps,
    D: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, HAS_U: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    live = rows < num_rows
    mask = live[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.reduce(x, 1, _add) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.reduce(xc * xc, 1, _add) / D + eps)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    if HAS_U:
        y = y * tl.load(u_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=live)
    tl.store(rstd_ptr + rows, rstd, mask=live)


@triton.jit(do_not_specialize=["num_rows"])  # one compile for every row count
def layer_norm_mul_bwd_kernel(
    dy_ptr, x_ptr, u_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dres_ptr, dx_ptr, du_ptr, dw_part_ptr, db_part_ptr,
    num_rows, stride_dy, stride_x, stride_u, stride_dres, stride_dx, stride_du,
    D: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
    HAS_U: tl.constexpr, HAS_RES: tl.constexpr,
):  # fmt: skip
    # A program walks ROWS_PER_PROGRAM rows, BLOCK_ROWS at a time, and sums its share of dweight / dbias in registers:
    # one partial row per program (not per BLOCK_ROWS rows) for the caller to sum.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_live = cols < D
    w = tl.load(w_ptr + cols, mask=col_live, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_live, other=0.0).to(tl.float32)
    dw_acc = tl.full([BLOCK_ROWS, BLOCK_D], 0.0, tl.float32)
    db_acc = tl.full([BLOCK_ROWS, BLOCK_D], 0.0, tl.float32)
    first = pid.to(tl.int64) * ROWS_PER_PROGRAM
    for start in range(0, ROWS_PER_PROGRAM, BLOCK_ROWS):
        rows = first + start + tl.arange(0, BLOCK_ROWS)
        live = rows < num_rows
        mask = live[:, None] & col_live[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=live, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=live, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = dy  # the gradient reaching the LayerNorm's output (0 on masked elements: dy loaded as 0 there)
        if HAS_U:
            u = tl.load(u_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            du = dy * (xhat * w[None, :] + b[None, :])
            tl.store(du_ptr + rows[:, None] * stride_du + cols[None, :], du.to(du_ptr.dtype.element_ty), mask=mask)
            g = dy * u
        gw = g * w[None, :]
        c1 = tl.reduce(gw * xhat, 1, _add) / D
        c2 = tl.reduce(gw, 1, _add) / D
        dx = (gw - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_RES:  # x's gradient from its other use (the block's residual), added here instead of by autograd
            dx += tl.load(dres_ptr + rows[:, None] * stride_dres + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw_acc += g * xhat
        db_acc += g
    # This program's rows' share of dweight / dbias, summed over programs by the caller (fixed order: deterministic).
    tl.store(dw_part_ptr + pid * D + cols, tl.reduce(dw_acc, 0, _add), mask=col_live)
    tl.store(db_part_ptr + pid * D + cols, tl.reduce(db_acc, 0, _add), mask=col_live)
