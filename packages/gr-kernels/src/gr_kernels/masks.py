"""Which key each query may attend to in HSTU attention, as a dense ``[B, N, N]`` boolean mask.

For a sequence of length ``L`` with ``T`` targets (candidates) at its end, the history is the first ``Hh = L - T``
tokens and includes the contextual prefix of ``C = min(contextual_seq_len, Hh)`` tokens (a sequence shorter than
``contextual_seq_len`` is all context). With ``W = max_attn_len`` and ``G = target_group_size``, query row ``i``
may attend key column ``j`` (both 0-based inside the sequence) iff:

- target column (``j >= Hh``): ``i`` is a target of the same group, ``(i - Hh) // G == (j - Hh) // G``, and
  ``j <= i`` (whatever ``causal`` says); with ``G = 1`` a candidate sees the history and itself only;
- context column (``j < C``): always;
- context row (``i < C``) on a history column: always (the whole history, ignoring causality and the window);
- target row (``i >= Hh``) on a history column: ``W == 0 or Hh - j <= W`` (the target sits at position ``Hh``);
- other history pairs: ``j <= i`` when ``causal`` (any ``j`` otherwise) and, when ``W > 0``, ``|i - j| <= W``;
- nothing outside ``[0, L)`` (padding up to ``max_seq_len``) is visible.

Delta q (incremental inference): with ``q_lengths`` given, sequence ``b`` has only ``Q = q_lengths[b] <= L`` queries,
its last ``Q`` tokens, and the mask has one row per query instead of per position: row ``r < Q`` is the row of
position ``L - Q + r`` of the full mask above; rows ``r >= Q`` (padding up to ``max_q_len``) see nothing.
"""

from __future__ import annotations

import torch


def hstu_valid_mask(
    lengths: torch.Tensor,
    max_seq_len: int,
    *,
    causal: bool = True,
    max_attn_len: int = 0,
    contextual_seq_len: int = 0,
    num_targets: torch.Tensor | None = None,
    target_group_size: int = 1,
    q_lengths: torch.Tensor | None = None,
    max_q_len: int | None = None,
) -> torch.Tensor:
    """Boolean ``[B, N, N]`` mask, ``N = max_seq_len``: ``mask[b, i, j]`` = query ``i`` may attend key ``j``.

    With ``q_lengths`` (delta q, integer ``[B]``, ``q_lengths[b] <= lengths[b]``) the mask is ``[B, max_q_len, N]``
    and ``mask[b, r, j]`` = the ``r``-th of the last ``q_lengths[b]`` tokens may attend key ``j``; ``max_q_len``
    (default ``max_seq_len``) must be >= every ``q_lengths[b]``. A query that would sit before the sequence start
    (``q_lengths[b] > lengths[b]``, invalid input) sees nothing.

    ``lengths``, ``num_targets`` and ``q_lengths`` are integer ``[B]`` tensors; their values are not read on the
    host, so this builds without a device sync.
    """
    n = max_seq_len
    device = lengths.device
    length = lengths.to(torch.int64).view(-1, 1, 1)
    j = torch.arange(n, device=device).view(1, 1, n)
    if q_lengths is None:
        i = torch.arange(n, device=device).view(1, n, 1)
        in_seq = (i < length) & (j < length)
    else:
        # Row r of sequence b is the query at position L - Q + r (the queries are the last Q tokens).
        rows = n if max_q_len is None else max_q_len
        num_q = q_lengths.to(torch.int64).view(-1, 1, 1)
        r = torch.arange(rows, device=device).view(1, rows, 1)
        i = length - num_q + r
        in_seq = (r < num_q) & (i >= 0) & (j < length)

    near = (j <= i) if causal else torch.ones_like(in_seq)
    if max_attn_len > 0:
        near = near & ((i - j).abs() <= max_attn_len)
    if num_targets is None and contextual_seq_len == 0:
        # Plain sequences: one [N, N] pattern shared by all (per sequence with delta q), cut at each length.
        return near & in_seq

    targets = torch.zeros_like(length) if num_targets is None else num_targets.to(torch.int64).view(-1, 1, 1)
    hist = length - targets
    ctx = hist.clamp(max=contextual_seq_len)
    tgt_i, tgt_j = i >= hist, j >= hist
    ctx_i, ctx_j = i < ctx, j < ctx

    history_pairs = ~tgt_i & ~tgt_j & (ctx_i | ctx_j | near)
    if num_targets is None:
        return in_seq & history_pairs

    # A target reads the history as if it sat at position Hh, right after the last history item.
    reach = torch.ones_like(tgt_j) if max_attn_len == 0 else (hist - j <= max_attn_len)
    target_on_history = tgt_i & ~tgt_j & (ctx_j | reach)
    group_i = torch.div(i - hist, target_group_size, rounding_mode="floor")
    group_j = torch.div(j - hist, target_group_size, rounding_mode="floor")
    target_on_target = tgt_i & tgt_j & (group_i == group_j) & (j <= i)
    return in_seq & (history_pairs | target_on_history | target_on_target)
