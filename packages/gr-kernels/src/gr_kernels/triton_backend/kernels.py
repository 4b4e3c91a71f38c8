"""Triton kernels of HSTU attention: forward, backward dK/dV (+ optional atomic dQ), backward dQ (+ dRab).

Semantics are those of ``gr_kernels.reference`` (see ``gr_kernels.masks`` for the mask). Every program works on one
tile of one head of one sequence (grid ``(tiles, heads, sequences)``): jagged inputs need no padding and a program
whose tile lies past its sequence's length exits at once. Query rows are indexed by ``r`` inside the sequence's
queries (``r < Q``); a row sits at position ``i = L - Q + r`` (``Q = L`` without delta q), which is what the mask,
the bias row and the causal order use.

Tile skipping: each program first bounds the range of tiles the mask can reach (the causal diagonal, the window,
the contextual prefix, the targets) and visits only those. Within that range, tiles where every pair is visible
(all history, on the visible side of the diagonal and inside the window) run without building the mask; the
others ("edge" tiles) build it. Masked-out pairs get weight 0 and their loads are predicated, so garbage or
out-of-range rows never reach an output.

Numerics: Q K^T and every other product accumulate in fp32 (``tl.dot``); SiLU is ``z * sigmoid(z)`` with the
sigmoid from ``exp2``; the probabilities/gradients are rounded to the input dtype only as the operand of the next
matrix product (as flash attention does). fp32 inputs use IEEE fp32 products (``PRECISION="ieee"``), not TF32.

This module is loaded twice by ``launch.py``: once normally (compiled kernels for CUDA tensors) and once with the
Triton interpreter switched on (for CPU tensors), so it must stay free of module-level state, and it calls only
builtins of ``triton.language``: the ``@jit`` helpers of its standard library (``tl.zeros``, ``tl.sigmoid``, ...) are
compiled-mode objects when Triton was imported without the interpreter, which the interpreted copy cannot call.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _visible(i, j, row_ok, seq_len, hist, ctx, window, group,
             CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CONTEXT: tl.constexpr,
             HAS_TARGETS: tl.constexpr):  # fmt: skip
    """``mask[i, j]`` of ``gr_kernels.masks.hstu_valid_mask`` for positions ``i`` (queries) and ``j`` (keys)."""
    near = j <= i if CAUSAL else j >= 0
    if HAS_WINDOW:
        near = near & (i - j <= window) & (j - i <= window)
    if HAS_CONTEXT or HAS_TARGETS:
        history_j = j < hist
        seen = near
        if HAS_CONTEXT:
            seen = seen | (i < ctx) | (j < ctx)
        seen = seen & (i < hist) & history_j
        if HAS_TARGETS:
            target_i = i >= hist
            reach = (j < ctx) | (hist - j <= window) if HAS_WINDOW else j >= 0
            on_history = target_i & history_j & reach
            # Only read where both are targets (i, j >= hist): the division never sees a negative there.
            same_group = (i - hist) // group == (j - hist) // group
            on_target = target_i & (j >= hist) & same_group & (j <= i)
            seen = seen | on_history | on_target
        near = seen
    return row_ok & (j < seq_len) & near


@triton.jit
def _seq_info(SEQ_OFFSETS, Q_OFFSETS, NUM_TARGETS, b, contextual,
              DELTA_Q: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_TARGETS: tl.constexpr):  # fmt: skip
    """Key start, query start, length L, query count Q, history length and context length of sequence ``b``."""
    kv_start = tl.load(SEQ_OFFSETS + b).to(tl.int64)
    seq_len = (tl.load(SEQ_OFFSETS + b + 1) - kv_start).to(tl.int32)
    if DELTA_Q:
        q_start = tl.load(Q_OFFSETS + b).to(tl.int64)
        num_q = (tl.load(Q_OFFSETS + b + 1) - q_start).to(tl.int32)
    else:
        q_start = kv_start
        num_q = seq_len
    hist = seq_len - tl.load(NUM_TARGETS + b).to(tl.int32) if HAS_TARGETS else seq_len
    ctx = tl.minimum(contextual, hist) if HAS_CONTEXT else hist * 0
    return kv_start, q_start, seq_len, num_q, hist, ctx


@triton.jit
def _query_tile_start(BLOCK_M: tl.constexpr):
    """First query row of this program's tile. Last query tiles first: under a causal mask they see the most keys,
    so the grid's tail holds the light ones."""
    return (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M


@triton.jit
def _query_rows(r0, seq_len, num_q, BLOCK_M: tl.constexpr):
    """The tile's query rows (``rows`` within the sequence's queries, ``row_ok``), their positions ``i`` among the
    keys (queries are the last ``num_q`` tokens), and the first and last valid position."""
    base = seq_len - num_q
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < num_q
    return rows, row_ok, base + rows, base + r0, base + tl.minimum(r0 + BLOCK_M, num_q) - 1


@triton.jit
def _key_range(i_first, i_last, seq_len, hist, ctx, window,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CONTEXT: tl.constexpr):  # fmt: skip
    """Keys ``[lo, hi)`` that query positions ``[i_first, i_last]`` may see (a superset of the visible ones)."""
    if CAUSAL:
        hi = i_last + 1
    elif HAS_WINDOW:
        hi = tl.minimum(seq_len, i_last + window + 1)
    else:
        hi = seq_len
    lo = hi * 0
    if HAS_WINDOW:
        # History rows look back at most `window`; target rows read the history from position `hist`.
        lo = tl.maximum(lo, tl.minimum(i_first, hist) - window)
    if HAS_CONTEXT:
        # Context rows see the whole history; context columns are seen by everyone.
        if i_first < ctx:
            hi = tl.maximum(hi, hist)
        if ctx > 0:
            lo = lo * 0
    return lo, hi


@triton.jit
def _query_range(j_first, j_last, seq_len, hist, ctx, window,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CONTEXT: tl.constexpr):  # fmt: skip
    """Query positions ``[lo, hi)`` that may see keys ``[j_first, j_last]`` (a superset of the ones that do)."""
    if CAUSAL:
        lo = j_first
    elif HAS_WINDOW:
        lo = tl.maximum(j_first - window, 0)
    else:
        lo = j_first * 0
    hi = seq_len + 0
    if HAS_WINDOW:  # noqa: SIM102  (a constexpr test around a runtime one)
        # Target rows see history keys within `window` of `hist`, and target keys of their group: all rows then.
        if j_last < hist - window:
            hi = tl.minimum(seq_len, j_last + window + 1)
    if HAS_CONTEXT:
        if ctx > 0:
            lo = lo * 0  # context rows see every history key
            hi = tl.maximum(hi, ctx)
        if j_first < ctx:
            hi = seq_len + 0
    return lo, hi


@triton.jit
def _full_key_tiles(i_first, hist, window, t_start, t_end, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):  # fmt: skip
    """Key tiles ``[f_lo, f_hi)`` (inside ``[t_start, t_end)``) where all BLOCK_M rows from ``i_first`` see every key.

    Needs all rows to be history (``i_first + BLOCK_M <= hist``), the tile to be history, on the visible side of the
    diagonal and inside the window. Operands of ``//`` are kept >= 0 (C and Python round negative quotients apart).
    """
    f_hi = hist // BLOCK_N
    if CAUSAL:
        f_hi = tl.minimum(f_hi, (i_first + 1) // BLOCK_N)
    elif HAS_WINDOW:
        f_hi = tl.minimum(f_hi, (i_first + 1 + window) // BLOCK_N)
    f_lo = t_start
    if HAS_WINDOW:
        f_lo = tl.maximum(f_lo, (tl.maximum(i_first + BLOCK_M - 1 - window, 0) + BLOCK_N - 1) // BLOCK_N)
    if i_first + BLOCK_M > hist:
        f_hi = f_lo * 0
    f_lo = tl.minimum(tl.maximum(f_lo, t_start), t_end)
    f_hi = tl.minimum(tl.maximum(f_hi, f_lo), t_end)
    return f_lo, f_hi


@triton.jit
def _full_query_tiles(j_first, hist, base, window, u_start, u_end, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):  # fmt: skip
    """Query tiles ``[g_lo, g_hi)`` (rows ``u * BLOCK_M`` on, at positions ``base + row``) that see every key of
    the BLOCK_N keys from ``j_first``; the transpose of ``_full_key_tiles``."""
    g_hi = tl.maximum(hist - base, 0) // BLOCK_M
    g_lo = u_start
    if CAUSAL:
        g_lo = tl.maximum(g_lo, (tl.maximum(j_first + BLOCK_N - 1 - base, 0) + BLOCK_M - 1) // BLOCK_M)
    elif HAS_WINDOW:
        g_lo = tl.maximum(g_lo, (tl.maximum(j_first + BLOCK_N - 1 - window - base, 0) + BLOCK_M - 1) // BLOCK_M)
    if HAS_WINDOW:
        g_hi = tl.minimum(g_hi, tl.maximum(j_first + window + 1 - base, 0) // BLOCK_M)
    if j_first + BLOCK_N > hist:
        g_hi = g_lo * 0
    g_lo = tl.minimum(tl.maximum(g_lo, u_start), u_end)
    g_hi = tl.minimum(tl.maximum(g_hi, g_lo), u_end)
    return g_lo, g_hi


@triton.jit
def _load_tile(base, rows, stride, rows_ok, ROW_MASK: tl.constexpr, DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """``[len(rows), BLOCK_D]`` rows of a ``[*, DIM]`` matrix at ``base`` (zeros where masked).

    Offsets are int32 (the launcher checks they fit) and masks appear only where they can be false, so the loads
    stay 16-byte vectors: a mask that varies along the head dim would split them into scalar loads.
    """
    cols = tl.arange(0, BLOCK_D)
    ptrs = base + (rows * stride)[:, None] + cols[None, :]
    if DIM == BLOCK_D:
        x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0) if ROW_MASK else tl.load(ptrs)
    elif ROW_MASK:
        x = tl.load(ptrs, mask=rows_ok[:, None] & (cols[None, :] < DIM), other=0.0)
    else:
        x = tl.load(ptrs, mask=cols[None, :] < DIM, other=0.0)
    return x


@triton.jit
def _store_tile(base, rows, stride, rows_ok, x, DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.arange(0, BLOCK_D)
    ptrs = base + (rows * stride)[:, None] + cols[None, :]
    if DIM == BLOCK_D:
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=rows_ok[:, None])
    else:
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=rows_ok[:, None] & (cols[None, :] < DIM))


@triton.jit
def _silu_parts(s, alpha):
    """``z = alpha * s`` and ``sigmoid(z)``."""
    z = s * alpha
    sig = 1.0 / (1.0 + tl.exp2(-z * LOG2E))
    return z, sig


# ----------------------------------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_tiles(acc, q, K_seq, V_seq, RAB_seq, stride_kt, stride_vt, stride_ri,
               i, rows, row_ok, seq_len, hist, ctx, window, group, alpha, t_lo, t_hi,
               DIM_QK: tl.constexpr, DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CONTEXT: tl.constexpr,
               HAS_TARGETS: tl.constexpr, HAS_RAB: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    for t in range(t_lo, t_hi):
        j = t * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = j < seq_len
        k = _load_tile(K_seq, j, stride_kt, key_ok, MASKED, DIM_QK, BLOCK_DQK)
        v = _load_tile(V_seq, j, stride_vt, key_ok, MASKED, DIM_V, BLOCK_DV)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if MASKED:
            visible = _visible(i[:, None], j[None, :], row_ok[:, None], seq_len, hist, ctx, window, group,
                               CAUSAL, HAS_WINDOW, HAS_CONTEXT, HAS_TARGETS)  # fmt: skip
        if HAS_RAB:
            rab_ptr = RAB_seq + (i * stride_ri)[:, None] + j[None, :]
            if MASKED:
                s += tl.load(rab_ptr, mask=visible, other=0.0).to(tl.float32)
            else:
                s += tl.load(rab_ptr).to(tl.float32)
        z, sig = _silu_parts(s, alpha)
        a = z * sig
        if MASKED:
            a = tl.where(visible, a, 0.0)
        acc += tl.dot(a.to(v.dtype), v, input_precision=PRECISION)
    return acc


@triton.jit
def hstu_fwd_kernel(Q, K, V, RAB, OUT, SEQ_OFFSETS, Q_OFFSETS, NUM_TARGETS,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                    stride_rb, stride_rh, stride_ri,
                    alpha, inv_scale, window, contextual, group, seq_bucket,
                    DIM_QK: tl.constexpr, DIM_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CONTEXT: tl.constexpr,
                    HAS_TARGETS: tl.constexpr, HAS_RAB: tl.constexpr, DELTA_Q: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """One program: BLOCK_M query rows of one head of one sequence; ``seq_bucket`` only keys the autotuner."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    kv_start, q_start, seq_len, num_q, hist, ctx = _seq_info(
        SEQ_OFFSETS, Q_OFFSETS, NUM_TARGETS, b, contextual, DELTA_Q, HAS_CONTEXT, HAS_TARGETS
    )
    r0 = _query_tile_start(BLOCK_M)
    if r0 >= num_q:
        return
    rows, row_ok, i, i_first, i_last = _query_rows(r0, seq_len, num_q, BLOCK_M)

    q = _load_tile(Q + q_start * stride_qt + h * stride_qh, rows, stride_qt, row_ok, True, DIM_QK, BLOCK_DQK)
    K_seq = K + kv_start * stride_kt + h * stride_kh
    V_seq = V + kv_start * stride_vt + h * stride_vh
    RAB_seq = RAB + b.to(tl.int64) * stride_rb + h.to(tl.int64) * stride_rh

    lo, hi = _key_range(i_first, i_last, seq_len, hist, ctx, window, CAUSAL, HAS_WINDOW, HAS_CONTEXT)
    t_start = lo // BLOCK_N
    t_end = (hi + BLOCK_N - 1) // BLOCK_N
    f_lo, f_hi = _full_key_tiles(i_first, hist, window, t_start, t_end, BLOCK_M, BLOCK_N,
                                 CAUSAL, HAS_WINDOW)  # fmt: skip
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, tl.float32)
    # Unmasked interior first, then the edge tiles on either side of it.
    acc = _fwd_tiles(acc, q, K_seq, V_seq, RAB_seq, stride_kt, stride_vt, stride_ri,
                     i, rows, row_ok, seq_len, hist, ctx, window, group, alpha, f_lo, f_hi,
                     DIM_QK, DIM_V, BLOCK_N, BLOCK_DQK, BLOCK_DV, False,
                     CAUSAL, HAS_WINDOW, HAS_CONTEXT, HAS_TARGETS, HAS_RAB, PRECISION)  # fmt: skip
    acc = _fwd_tiles(acc, q, K_seq, V_seq, RAB_seq, stride_kt, stride_vt, stride_ri,
                     i, rows, row_ok, seq_len, hist, ctx, window, group, alpha, t_start, f_lo,
                     DIM_QK, DIM_V, BLOCK_N, BLOCK_DQK, BLOCK_DV, True,
                     CAUSAL, HAS_WINDOW, HAS_CONTEXT, HAS_TARGETS, HAS_RAB, PRECISION)  # fmt: skip
    acc = _fwd_tiles(acc, q, K_seq, V_seq, RAB_seq, stride_kt, stride_vt, stride_ri,
                     i, rows, row_ok, seq_len, hist, ctx, window, group, alpha, f_hi, t_end,
                     DIM_QK, DIM_V, BLOCK_N, BLOCK_DQK, BLOCK_DV, True,
                     CAUSAL, HAS_WINDOW, HAS_CONTEXT, HAS_TARGETS, HAS_RAB, PRECISION)  # fmt: skip
    _store_tile(OUT + q_start * stride_ot + h * stride_oh, rows, stride_ot, row_ok, acc * inv_scale, DIM_V, BLOCK_DV)


# ---------------------------------------------------------------------------------------------- backward: dK and dV
@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q_seq, DO_seq, DQ_seq, RAB_seq, DRAB_seq,
                stride_qt, stride_dot, stride_dqt, stride_ri,
                j, num_q, base, seq_len, hist, ctx, window, group, alpha, inv_scale, u_lo, u_hi,
                DIM_QK: tl.constexpr, DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CONTEXT: tl.constexpr,
                HAS_TARGETS: tl.constexpr, HAS_RAB: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                DRAB_MODE: tl.constexpr, PRECISION: tl.constexpr, PASS: tl.constexpr):  # fmt: skip
    """Scores are kept transposed (``[keys, queries]``) so that dV += A^T dO and dK += dS^T Q need no transpose."""
    for u in range(u_lo, u_hi):
        rows = u * BLOCK_M + tl.arange(0, BLOCK_M)
        i = base + rows
        row_ok = rows < num_q
        q = _load_tile(Q_seq, rows, stride_qt, row_ok, MASKED, DIM_QK, BLOCK_DQK)
        do = _load_tile(DO_seq, rows, stride_dot, row_ok, MASKED, DIM_V, BLOCK_DV)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        if MASKED:
            visible_t = _visible(i[None, :], j[:, None], row_ok[None, :], seq_len, hist, ctx, window, group,
                                 CAUSAL, HAS_WINDOW, HAS_CONTEXT, HAS_TARGETS)  # fmt: skip
        if HAS_RAB:
            rab_ptr = RAB_seq + (i * stride_ri)[None, :] + j[:, None]
            if MASKED:
                s_t += tl.load(rab_ptr, mask=visible_t, other=0.0).to(tl.float32)
            else:
                s_t += tl.load(rab_ptr).to(tl.float32)
        z, sig = _silu_parts(s_t, alpha)
        w = inv_scale
        if MASKED:
            w = tl.where(visible_t, inv_scale, 0.0)
        if PASS != 2:
            a_t = z * sig * w
            dv += tl.dot(a_t.to(do.dtype), do, input_precision=PRECISION)
        if PASS != 1:
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = dp_t * w * sig * (1.0 + z * (1.0 - sig)) * alpha
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
        if ATOMIC_DQ and PASS != 1:
            dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=PRECISION)
            d_qk = tl.arange(0, BLOCK_DQK)
            dq_ptr = DQ_seq + (rows * stride_dqt)[:, None] + d_qk[None, :]
            tl.atomic_add(dq_ptr, dq, mask=row_ok[:, None] & (d_qk[None, :] < DIM_QK), sem="relaxed")
        if DRAB_MODE != 0 and PASS != 1:
            drab_ptr = DRAB_seq + (i * stride_ri)[None, :] + j[:, None]
            in_range = row_ok[None, :] & (j[:, None] < seq_len)
            if DRAB_MODE == 1:
                tl.store(drab_ptr, ds_t.to(DRAB_seq.dtype.element_ty), mask=in_range)
            else:
                tl.atomic_add(drab_ptr, ds_t, mask=in_range, sem="relaxed")
    return dk, dv


@triton.jit
def hstu_bwd_dkdv_kernel(Q, K, V, DO, DQ, DK, DV, RAB, DRAB, SEQ_OFFSETS, Q_OFFSETS, NUM_TARGETS,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                         stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                         stride_rb, stride_rh, stride_ri,
                         alpha, inv_scale, window, contextual, group, seq_bucket,
                         DIM_QK: tl.constexpr, DIM_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                         CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CONTEXT: tl.constexpr,
                         HAS_TARGETS: tl.constexpr, HAS_RAB: tl.constexpr, DELTA_Q: tl.constexpr,
                         ATOMIC_DQ: tl.constexpr, DRAB_MODE: tl.constexpr, PRECISION: tl.constexpr,
                         PASS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """One program: BLOCK_N keys of one head of one sequence; dK/dV stay in registers over the query tiles.

    ``ATOMIC_DQ``: also adds dQ = dS K into an fp32 buffer with atomics (else ``hstu_bwd_dq_kernel`` computes dQ).
    ``DRAB_MODE``: 0 no bias gradient here, 1 store it (one head per bias head), 2 add it atomically (fp32 buffer,
    a bias shared by several heads). ``PASS``: 0 dK and dV together; 1 dV only; 2 dK only (with the dQ/dRab work):
    at head dim 256 two fp32 [BLOCK_N, 256] accumulators plus K and V exceed the register file, so the launcher
    runs two passes, each with one accumulator (one extra Q K^T product per tile pair, no spills).
    """
    h = tl.program_id(1)
    b = tl.program_id(2)
    kv_start, q_start, seq_len, num_q, hist, ctx = _seq_info(
        SEQ_OFFSETS, Q_OFFSETS, NUM_TARGETS, b, contextual, DELTA_Q, HAS_CONTEXT, HAS_TARGETS
    )
    j0 = tl.program_id(0) * BLOCK_N
    if j0 >= seq_len:
        return
    base = seq_len - num_q
    j = j0 + tl.arange(0, BLOCK_N)
    key_ok = j < seq_len
    k = _load_tile(K + kv_start * stride_kt + h * stride_kh, j, stride_kt, key_ok, True, DIM_QK, BLOCK_DQK)
    if PASS != 1:
        v = _load_tile(V + kv_start * stride_vt + h * stride_vh, j, stride_vt, key_ok, True, DIM_V, BLOCK_DV)
    else:
        v = k  # unused by the dV-only pass

    lo, hi = _query_range(j0, tl.minimum(j0 + BLOCK_N, seq_len) - 1, seq_len, hist, ctx, window,
                          CAUSAL, HAS_WINDOW, HAS_CONTEXT)  # fmt: skip
    # Positions -> query rows (row r sits at base + r), then rows -> tiles of BLOCK_M.
    r_lo = tl.maximum(lo - base, 0)
    r_hi = tl.minimum(hi - base, num_q)
    u_start = r_lo // BLOCK_M
    u_end = (tl.maximum(r_hi, 0) + BLOCK_M - 1) // BLOCK_M
    g_lo, g_hi = _full_query_tiles(j0, hist, base, window, u_start, u_end, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)

    Q_seq = Q + q_start * stride_qt + h * stride_qh
    DO_seq = DO + q_start * stride_dot + h * stride_doh
    DQ_seq = DQ + q_start * stride_dqt + h * stride_dqh
    RAB_seq = RAB + b.to(tl.int64) * stride_rb + h.to(tl.int64) * stride_rh
    DRAB_seq = DRAB + b.to(tl.int64) * stride_rb + h.to(tl.int64) * stride_rh
    dk = tl.full([BLOCK_N, BLOCK_DQK], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_DV], 0.0, tl.float32)
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q_seq, DO_seq, DQ_seq, RAB_seq, DRAB_seq,
                         stride_qt, stride_dot, stride_dqt, stride_ri,
                         j, num_q, base, seq_len, hist, ctx, window, group, alpha, inv_scale, g_lo, g_hi,
                         DIM_QK, DIM_V, BLOCK_M, BLOCK_DQK, BLOCK_DV, False, CAUSAL, HAS_WINDOW, HAS_CONTEXT,
                         HAS_TARGETS, HAS_RAB, ATOMIC_DQ, DRAB_MODE, PRECISION, PASS)  # fmt: skip
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q_seq, DO_seq, DQ_seq, RAB_seq, DRAB_seq,
                         stride_qt, stride_dot, stride_dqt, stride_ri,
                         j, num_q, base, seq_len, hist, ctx, window, group, alpha, inv_scale, u_start, g_lo,
                         DIM_QK, DIM_V, BLOCK_M, BLOCK_DQK, BLOCK_DV, True, CAUSAL, HAS_WINDOW, HAS_CONTEXT,
                         HAS_TARGETS, HAS_RAB, ATOMIC_DQ, DRAB_MODE, PRECISION, PASS)  # fmt: skip
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q_seq, DO_seq, DQ_seq, RAB_seq, DRAB_seq,
                         stride_qt, stride_dot, stride_dqt, stride_ri,
                         j, num_q, base, seq_len, hist, ctx, window, group, alpha, inv_scale, g_hi, u_end,
                         DIM_QK, DIM_V, BLOCK_M, BLOCK_DQK, BLOCK_DV, True, CAUSAL, HAS_WINDOW, HAS_CONTEXT,
                         HAS_TARGETS, HAS_RAB, ATOMIC_DQ, DRAB_MODE, PRECISION, PASS)  # fmt: skip
    if PASS != 1:
        _store_tile(DK + kv_start * stride_dkt + h * stride_dkh, j, stride_dkt, key_ok, dk, DIM_QK, BLOCK_DQK)
    if PASS != 2:
        _store_tile(DV + kv_start * stride_dvt + h * stride_dvh, j, stride_dvt, key_ok, dv, DIM_V, BLOCK_DV)


# ---------------------------------------------------------------------------------------------- backward: dQ (+dRab)
@triton.jit
def _dq_tiles(dq, q, do, K_seq, V_seq, RAB_seq, DRAB_seq, stride_kt, stride_vt, stride_ri,
              i, rows, row_ok, num_q, seq_len, hist, ctx, window, group, alpha, inv_scale, t_lo, t_hi,
              DIM_QK: tl.constexpr, DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CONTEXT: tl.constexpr,
              HAS_TARGETS: tl.constexpr, HAS_RAB: tl.constexpr, DRAB_MODE: tl.constexpr,
              PRECISION: tl.constexpr):  # fmt: skip
    for t in range(t_lo, t_hi):
        j = t * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = j < seq_len
        k = _load_tile(K_seq, j, stride_kt, key_ok, MASKED, DIM_QK, BLOCK_DQK)
        v = _load_tile(V_seq, j, stride_vt, key_ok, MASKED, DIM_V, BLOCK_DV)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if MASKED:
            visible = _visible(i[:, None], j[None, :], row_ok[:, None], seq_len, hist, ctx, window, group,
                               CAUSAL, HAS_WINDOW, HAS_CONTEXT, HAS_TARGETS)  # fmt: skip
        if HAS_RAB:
            rab_ptr = RAB_seq + (i * stride_ri)[:, None] + j[None, :]
            if MASKED:
                s += tl.load(rab_ptr, mask=visible, other=0.0).to(tl.float32)
            else:
                s += tl.load(rab_ptr).to(tl.float32)
        z, sig = _silu_parts(s, alpha)
        w = inv_scale
        if MASKED:
            w = tl.where(visible, inv_scale, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = dp * w * sig * (1.0 + z * (1.0 - sig)) * alpha
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        if DRAB_MODE != 0:
            drab_ptr = DRAB_seq + (i * stride_ri)[:, None] + j[None, :]
            in_range = row_ok[:, None] & key_ok[None, :]
            if DRAB_MODE == 1:
                tl.store(drab_ptr, ds.to(DRAB_seq.dtype.element_ty), mask=in_range)
            else:
                tl.atomic_add(drab_ptr, ds, mask=in_range, sem="relaxed")
    return dq


@triton.jit
def hstu_bwd_dq_kernel(Q, K, V, DO, DQ, RAB, DRAB, SEQ_OFFSETS, Q_OFFSETS, NUM_TARGETS,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                       stride_dqt, stride_dqh, stride_rb, stride_rh, stride_ri,
                       alpha, inv_scale, window, contextual, group, seq_bucket,
                       DIM_QK: tl.constexpr, DIM_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                       CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CONTEXT: tl.constexpr,
                       HAS_TARGETS: tl.constexpr, HAS_RAB: tl.constexpr, DELTA_Q: tl.constexpr,
                       DRAB_MODE: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """One program: BLOCK_M query rows of one head of one sequence; dQ in registers over the key tiles, the bias
    gradient of each visited tile written as it goes (``DRAB_MODE`` as in ``hstu_bwd_dkdv_kernel``)."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    kv_start, q_start, seq_len, num_q, hist, ctx = _seq_info(
        SEQ_OFFSETS, Q_OFFSETS, NUM_TARGETS, b, contextual, DELTA_Q, HAS_CONTEXT, HAS_TARGETS
    )
    r0 = _query_tile_start(BLOCK_M)
    if r0 >= num_q:
        return
    rows, row_ok, i, i_first, i_last = _query_rows(r0, seq_len, num_q, BLOCK_M)
    q = _load_tile(Q + q_start * stride_qt + h * stride_qh, rows, stride_qt, row_ok, True, DIM_QK, BLOCK_DQK)
    do = _load_tile(DO + q_start * stride_dot + h * stride_doh, rows, stride_dot, row_ok, True, DIM_V, BLOCK_DV)
    K_seq = K + kv_start * stride_kt + h * stride_kh
    V_seq = V + kv_start * stride_vt + h * stride_vh
    RAB_seq = RAB + b.to(tl.int64) * stride_rb + h.to(tl.int64) * stride_rh
    DRAB_seq = DRAB + b.to(tl.int64) * stride_rb + h.to(tl.int64) * stride_rh

    lo, hi = _key_range(i_first, i_last, seq_len, hist, ctx, window, CAUSAL, HAS_WINDOW, HAS_CONTEXT)
    t_start = lo // BLOCK_N
    t_end = (hi + BLOCK_N - 1) // BLOCK_N
    f_lo, f_hi = _full_key_tiles(i_first, hist, window, t_start, t_end, BLOCK_M, BLOCK_N,
                                 CAUSAL, HAS_WINDOW)  # fmt: skip
    dq = tl.full([BLOCK_M, BLOCK_DQK], 0.0, tl.float32)
    dq = _dq_tiles(dq, q, do, K_seq, V_seq, RAB_seq, DRAB_seq, stride_kt, stride_vt, stride_ri,
                   i, rows, row_ok, num_q, seq_len, hist, ctx, window, group, alpha, inv_scale, f_lo, f_hi,
                   DIM_QK, DIM_V, BLOCK_N, BLOCK_DQK, BLOCK_DV, False, CAUSAL, HAS_WINDOW, HAS_CONTEXT,
                   HAS_TARGETS, HAS_RAB, DRAB_MODE, PRECISION)  # fmt: skip
    dq = _dq_tiles(dq, q, do, K_seq, V_seq, RAB_seq, DRAB_seq, stride_kt, stride_vt, stride_ri,
                   i, rows, row_ok, num_q, seq_len, hist, ctx, window, group, alpha, inv_scale, t_start, f_lo,
                   DIM_QK, DIM_V, BLOCK_N, BLOCK_DQK, BLOCK_DV, True, CAUSAL, HAS_WINDOW, HAS_CONTEXT,
                   HAS_TARGETS, HAS_RAB, DRAB_MODE, PRECISION)  # fmt: skip
    dq = _dq_tiles(dq, q, do, K_seq, V_seq, RAB_seq, DRAB_seq, stride_kt, stride_vt, stride_ri,
                   i, rows, row_ok, num_q, seq_len, hist, ctx, window, group, alpha, inv_scale, f_hi, t_end,
                   DIM_QK, DIM_V, BLOCK_N, BLOCK_DQK, BLOCK_DV, True, CAUSAL, HAS_WINDOW, HAS_CONTEXT,
                   HAS_TARGETS, HAS_RAB, DRAB_MODE, PRECISION)  # fmt: skip
    _store_tile(DQ + q_start * stride_dqt + h * stride_dqh, rows, stride_dqt, row_ok, dq, DIM_QK, BLOCK_DQK)
