"""Triton kernel of ``linear_silu_split``'s backward (launched by ``silu_projection``): the gradient of the projection's
pre-activation ``dy = silu'(y) * g`` where ``g`` is the concatenation of the output pieces' gradients (read from
their own tensors, so their concatenation is never written), and per-program partial column sums of ``dy`` (the bias
gradient, summed over programs by the caller).

A program owns ``BLOCK_N`` columns of ``ROWS_PER_PROGRAM`` rows, walked ``BLOCK_M`` rows at a time, and sums its
column block in registers, reduced once at the end. The pieces' column bounds ``C1 < C2 < C3`` are compile-time
constants (one specialisation per model shape); with ``ONE_PIECE`` (``BLOCK_N`` divides every piece's width, e.g.
the 512-wide pieces of 4 heads x 128) a program reads its piece's gradient through one pointer, else each column
picks its piece by mask. Loaded twice by
``silu_projection`` (compiled for CUDA tensors, interpreted for CPU ones): no module-level state, and only builtins of
``triton.language`` (``tl.full``, ``tl.exp``, ``tl.reduce``; see ``gathered_logits_kernels``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


@triton.jit(do_not_specialize=["num_rows"])  # one compile for every row count
def silu_split_bwd_kernel(
    g0_ptr, g1_ptr, g2_ptr, g3_ptr, y_ptr, dy_ptr, db_part_ptr, num_rows,
    stride_g0, stride_g1, stride_g2, stride_g3, stride_y, stride_dy,
    W: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_PIECE: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    c0 = pid_n * BLOCK_N
    cols = c0 + tl.arange(0, BLOCK_N)
    col_live = cols < W
    c = cols[None, :]
    if ONE_PIECE:
        # BLOCK_N divides every piece's width: this program's columns lie in one piece, read through one pointer.
        if c0 < C1:
            g_cols = g0_ptr + c
            stride_g = stride_g0
        elif c0 < C2:
            g_cols = g1_ptr + (c - C1)
            stride_g = stride_g1
        elif c0 < C3:
            g_cols = g2_ptr + (c - C2)
            stride_g = stride_g2
        else:
            g_cols = g3_ptr + (c - C3)
            stride_g = stride_g3
    in0 = (cols < C1)[None, :]
    in1 = ((cols >= C1) & (cols < C2))[None, :]
    in2 = ((cols >= C2) & (cols < C3))[None, :]
    in3 = ((cols >= C3) & col_live)[None, :]
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    first = pid_m.to(tl.int64) * ROWS_PER_PROGRAM
    for start in range(0, ROWS_PER_PROGRAM, BLOCK_M):
        rows = first + start + tl.arange(0, BLOCK_M)
        live = (rows < num_rows)[:, None]
        r = rows[:, None]
        mask = live & col_live[None, :]
        if ONE_PIECE:
            g = tl.load(g_cols + r * stride_g, mask=mask, other=0.0).to(tl.float32)
        else:  # each column belongs to one piece: the other three loads are masked off (no memory traffic)
            g = tl.load(g0_ptr + r * stride_g0 + c, mask=live & in0, other=0.0).to(tl.float32)
            g += tl.load(g1_ptr + r * stride_g1 + (c - C1), mask=live & in1, other=0.0).to(tl.float32)
            g += tl.load(g2_ptr + r * stride_g2 + (c - C2), mask=live & in2, other=0.0).to(tl.float32)
            g += tl.load(g3_ptr + r * stride_g3 + (c - C3), mask=live & in3, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + r * stride_y + c, mask=mask, other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-y))
        dy = g * s * (1.0 + y * (1.0 - s))
        tl.store(dy_ptr + r * stride_dy + c, dy.to(dy_ptr.dtype.element_ty), mask=mask)
        acc += dy  # masked elements are 0 (g and y loaded as 0)
    tl.store(db_part_ptr + pid_m * W + cols, tl.reduce(acc, 0, _add), mask=col_live)
