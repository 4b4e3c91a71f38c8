"""Triton kernels of ``gathered_logits`` (launched by ``gathered_logits_triton``): ``out[n, k] = <q[n], c[idx[n, k]]>``
and its two gradients, every product and sum in fp32, the gathered rows read straight from ``q`` / ``c`` (nothing of
shape ``[N, K, D]`` is ever written).

- forward: one program per ``BLOCK_P`` consecutive picks ``p = n * K + k`` (any K, no padding of the pick axis).
- grad_q: one program per ``BLOCK_N`` queries and ``BLOCK_D`` columns, walking the K picks of its queries.
- grad_c: the picks sorted by candidate (CSR: candidate ``m``'s run is ``order[offsets[m]:offsets[m + 1]]``), each
  run cut into segments of at most ``segment`` picks; one program per segment (and ``BLOCK_D`` columns) sums
  ``g * q`` over it. A run of one segment (every run of a uniform draw) is written straight to its grad_c row; a
  longer one (a candidate picked very often) leaves fp32 partial rows that a second kernel sums in order. No
  atomics, every sum in a fixed order (deterministic), no zero-fill of grad_c, and a popular candidate's work
  spreads over many programs.

Loaded twice by ``gathered_logits_triton`` (compiled for CUDA tensors, interpreted for CPU ones), so it keeps no
module-level state and calls only builtins of ``triton.language`` (``tl.full``, ``tl.reduce``): the ``@jit`` helpers of
Triton's standard library (``tl.zeros``, ``tl.sum``) are compiled-mode objects once Triton was imported without the
interpreter, which the interpreted copy cannot call.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def gathered_logits_fwd_kernel(
    q_ptr, c_ptr, idx_ptr, out_ptr, num_picks, stride_q, stride_c,
    K: tl.constexpr, D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    picks = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    live = picks < num_picks
    rows_c = tl.load(idx_ptr + picks, mask=live, other=0)
    q_base = q_ptr + (picks // K)[:, None] * stride_q
    c_base = c_ptr + rows_c[:, None] * stride_c
    cols = tl.arange(0, BLOCK_D)[None, :]
    acc = tl.full([BLOCK_P], 0.0, tl.float32)
    for d0 in range(0, D, BLOCK_D):
        mask = live[:, None] if EVEN_D else live[:, None] & (d0 + cols < D)
        qv = tl.load(q_base + d0 + cols, mask=mask, other=0.0)
        cv = tl.load(c_base + d0 + cols, mask=mask, other=0.0)
        acc += tl.reduce(qv.to(tl.float32) * cv.to(tl.float32), 1, _add)
    tl.store(out_ptr + picks, acc.to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def gathered_logits_grad_q_kernel(
    g_ptr, c_ptr, idx_ptr, gq_ptr, num_rows, stride_c, stride_gq,
    K: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    live = rows < num_rows
    mask = live[:, None] if EVEN_D else live[:, None] & (cols < D)[None, :]
    acc = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    for k in range(K):
        picks = rows * K + k
        rows_c = tl.load(idx_ptr + picks, mask=live, other=0)
        g = tl.load(g_ptr + picks, mask=live, other=0.0).to(tl.float32)
        cv = tl.load(c_ptr + rows_c[:, None] * stride_c + cols[None, :], mask=mask, other=0.0)
        acc += g[:, None] * cv.to(tl.float32)
    tl.store(gq_ptr + rows[:, None] * stride_gq + cols[None, :], acc.to(gq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gathered_logits_grad_c_kernel(
    g_ptr, q_ptr, order_ptr, offsets_ptr, owner_ptr, seg_first_ptr, partial_row_ptr, gc_ptr, partial_ptr,
    num_candidates, stride_q, stride_gc, segment,
    K: tl.constexpr, D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """One program per segment (at most ``segment`` picks of one candidate's run): its row of grad_c when the run
    is one segment, else its fp32 partial row (summed by ``gathered_logits_grad_c_combine_kernel``)."""
    j = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    owner = tl.load(owner_ptr + j)
    valid = owner < num_candidates  # the grid is an upper bound on the number of segments
    m = tl.minimum(owner, num_candidates - 1)
    seg = j - tl.load(seg_first_ptr + m)
    run_start = tl.load(offsets_ptr + m)
    run_end = tl.load(offsets_ptr + m + 1)
    start = run_start + seg * segment
    end = tl.where(valid, tl.minimum(start + segment, run_end), start)
    acc = tl.full([BLOCK_P, BLOCK_D], 0.0, tl.float32)
    steps = ((end - start + BLOCK_P - 1) // BLOCK_P).to(tl.int32)  # an int32 trip count from 0 (not an i64 range)
    for step in range(0, steps):
        slots = start + step * BLOCK_P + tl.arange(0, BLOCK_P)
        live = slots < end
        picks = tl.load(order_ptr + slots, mask=live, other=0)
        g = tl.load(g_ptr + picks, mask=live, other=0.0).to(tl.float32)
        mask = live[:, None] if EVEN_D else live[:, None] & col_ok[None, :]
        qv = tl.load(q_ptr + (picks // K)[:, None] * stride_q + cols[None, :], mask=mask, other=0.0)
        acc += g[:, None] * qv.to(tl.float32)
    total = tl.reduce(acc, 0, _add)
    # Masked stores rather than a branch: one of the two writes, the other is masked off.
    multi = run_end - run_start > segment
    out = gc_ptr + m * stride_gc + cols
    tl.store(out, total.to(gc_ptr.dtype.element_ty), mask=col_ok & (valid & (multi == 0)))
    row = tl.load(partial_row_ptr + m) + seg  # meaningful for a multi-segment run only
    tl.store(partial_ptr + row * D + cols, total, mask=col_ok & (valid & multi))


@triton.jit
def gathered_logits_grad_c_combine_kernel(
    partial_ptr, multi_owner_ptr, partial_row_ptr, num_segments_ptr, gc_ptr, num_candidates, stride_gc,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per candidate whose run spans several segments: the sum of its partial rows, in order."""
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    owner = tl.load(multi_owner_ptr + tl.program_id(0))
    valid = owner < num_candidates  # the grid is an upper bound on the number of such candidates
    m = tl.minimum(owner, num_candidates - 1)
    first = tl.load(partial_row_ptr + m)
    count = tl.where(valid, tl.load(num_segments_ptr + m), 0)
    acc = tl.full([BLOCK_R, BLOCK_D], 0.0, tl.float32)
    for step in range(0, ((count + BLOCK_R - 1) // BLOCK_R).to(tl.int32)):
        rows = step * BLOCK_R + tl.arange(0, BLOCK_R)
        acc += tl.load(partial_ptr + (first + rows)[:, None] * D + cols[None, :],
                       mask=(rows < count)[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
    total = tl.reduce(acc, 0, _add)
    tl.store(gc_ptr + m * stride_gc + cols, total.to(gc_ptr.dtype.element_ty), mask=col_ok & valid)
