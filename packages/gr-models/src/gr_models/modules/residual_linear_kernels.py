"""Triton kernels of ``residual_linear`` (launched by ``residual_linear``): the forward's ``out = x + m + b`` (the
residual ``x``, the projection ``m = y W^T`` and its bias, summed in fp32 and written in ``out``'s dtype), and the
backward's one pass over the output gradient ``g``: ``g`` in the matmuls' dtype plus per-program partial column sums
of ``g`` (the bias gradient, summed over programs by the caller).

Programs hold whole rows (``BLOCK_D`` >= D, a power of two), ``BLOCK_ROWS`` at a time; the backward's walk
``ROWS_PER_PROGRAM`` rows and sum them in registers. Loaded twice by ``residual_linear`` (compiled for CUDA tensors,
interpreted for CPU ones): no module-level state, and only builtins of ``triton.language`` (``tl.full``,
``tl.reduce``; see ``gathered_logits_kernels``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


@triton.jit(do_not_specialize=["num_rows"])  # one compile for every row count
def residual_add_kernel(
    x_ptr, m_ptr, b_ptr, out_ptr, num_rows, stride_x, stride_m, stride_out,
    D: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < num_rows)[:, None] & (cols < D)[None, :]
    r = rows[:, None]
    c = cols[None, :]
    x = tl.load(x_ptr + r * stride_x + c, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + r * stride_m + c, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    tl.store(out_ptr + r * stride_out + c, (x + m + b[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_rows"])  # one compile for every row count
def cast_column_sums_kernel(
    g_ptr, gc_ptr, part_ptr, num_rows, stride_g, stride_gc,
    D: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_live = cols < D
    acc = tl.full([BLOCK_ROWS, BLOCK_D], 0.0, tl.float32)
    first = pid.to(tl.int64) * ROWS_PER_PROGRAM
    for start in range(0, ROWS_PER_PROGRAM, BLOCK_ROWS):
        rows = first + start + tl.arange(0, BLOCK_ROWS)
        mask = (rows < num_rows)[:, None] & col_live[None, :]
        g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(gc_ptr + rows[:, None] * stride_gc + cols[None, :], g.to(gc_ptr.dtype.element_ty), mask=mask)
        acc += g  # masked elements are 0
    tl.store(part_ptr + pid * D + cols, tl.reduce(acc, 0, _add), mask=col_live)
