"""Triton kernel of ``linear_silu_split``'s backward (launched by ``silu_projection``): the gradient of the projection's
pre-activation ``dy = silu'(y) * g`` where ``g`` is the concatenation of the output pieces' gradients (read from
their own tensors, so their concatenation is never written), and per-program partial column sums of ``dy`` (the bias
gradient, summed over programs by the caller).

A program owns ``BLOCK_N`` columns of ``ROWS_PER_PROGRAM`` rows, walked ``BLOCK_M`` rows at a time. The pieces'
column bounds ``C1 < C2 < C3`` are compile-time constants (one specialisation per model shape). Loaded twice by
``silu_projection`` (compiled for CUDA tensors, interpreted for CPU ones): no module-level state, and only builtins of
``triton.language`` (``tl.full``, ``tl.exp``, ``tl.reduce``; see ``gathered_logits_kernels``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def silu_split_bwd_kernel(
    g0_ptr, g1_ptr, g2_ptr, g3_ptr, y_ptr, dy_ptr, db_part_ptr, num_rows,
    stride_g0, stride_g1, stride_g2, stride_g3, stride_y, stride_dy,
    W: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_live = cols < W
    in0 = cols < C1
    in1 = (cols >= C1) & (cols < C2)
    in2 = (cols >= C2) & (cols < C3)
    in3 = (cols >= C3) & col_live
    acc = tl.full([BLOCK_N], 0.0, tl.float32)
    first = pid_m.to(tl.int64) * ROWS_PER_PROGRAM
    for start in range(0, ROWS_PER_PROGRAM, BLOCK_M):
        rows = first + start + tl.arange(0, BLOCK_M)
        live = (rows < num_rows)[:, None]
        r = rows[:, None]
        c = cols[None, :]
        # Each column belongs to one piece: the other three loads are masked off (no memory traffic).
        g = tl.load(g0_ptr + r * stride_g0 + c, mask=live & in0[None, :], other=0.0).to(tl.float32)
        g += tl.load(g1_ptr + r * stride_g1 + (c - C1), mask=live & in1[None, :], other=0.0).to(tl.float32)
        g += tl.load(g2_ptr + r * stride_g2 + (c - C2), mask=live & in2[None, :], other=0.0).to(tl.float32)
        g += tl.load(g3_ptr + r * stride_g3 + (c - C3), mask=live & in3[None, :], other=0.0).to(tl.float32)
        mask = live & col_live[None, :]
        y = tl.load(y_ptr + r * stride_y + c, mask=mask, other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-y))
        dy = g * s * (1.0 + y * (1.0 - s))
        tl.store(dy_ptr + r * stride_dy + c, dy.to(dy_ptr.dtype.element_ty), mask=mask)
        acc += tl.reduce(dy, 0, _add)
    tl.store(db_part_ptr + pid_m * W + cols, acc, mask=col_live)
