"""Which key each query may attend to in HSTU attention, as a dense ``[B, N, N]`` boolean mask.

For a sequence of length ``L`` with ``T`` targets (candidates) at its end and a contextual prefix of ``C``
tokens, the history is the first ``Hh = L - T`` tokens (context included; ``C`` is capped at ``Hh``). For query row
``i`` and key column ``j``:

- context columns (``j < C``) are visible to every row;
- context rows (``i < C``) see every history column (``j < Hh``), whatever ``causal``/window say;
- other history rows see history columns with ``j <= i`` (``causal=True``; any ``j`` when ``causal=False``) and,
  when ``max_attn_len = W > 0``, ``|i - j| <= W``;
- target rows see every history column, with the window measured from position ``Hh`` (a target sits where the
  next item would): ``Hh - j <= W``;
- target columns are visible only to target rows of the same group (``target_group_size`` consecutive targets
  starting at ``Hh``) and, when causal, only for ``j <= i``: with group size 1 a candidate sees the history and
  itself, never another candidate;
- nothing outside ``[0, L)`` is visible.
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
) -> torch.Tensor:
    """Boolean ``[B, N, N]`` mask (True = query ``i`` may attend key ``j``), ``N = max_seq_len``."""
    n = max_seq_len
    device = lengths.device
    lengths = lengths.to(torch.int64).view(-1, 1, 1)
    i = torch.arange(n, device=device).view(1, n, 1)
    j = torch.arange(n, device=device).view(1, 1, n)

    near = (j <= i) if causal else torch.ones(1, n, n, dtype=torch.bool, device=device)
    if max_attn_len > 0:
        near = near & ((i - j).abs() <= max_attn_len)
    if num_targets is None and contextual_seq_len == 0:
        # Fast path (plain sequences): the [N, N] pattern is shared, only the lengths differ per sequence.
        return near & (i < lengths) & (j < lengths)

    targets = torch.zeros_like(lengths) if num_targets is None else num_targets.to(torch.int64).view(-1, 1, 1)
    hist = lengths - targets
    ctx = hist.clamp(max=contextual_seq_len)
    in_seq = (i < lengths) & (j < lengths)
    tgt_i, tgt_j = i >= hist, j >= hist
    ctx_i, ctx_j = i < ctx, j < ctx
    history_rows = ~tgt_i & ~tgt_j & (ctx_i | ctx_j | near)
    if num_targets is None:
        return in_seq & history_rows

    target_reach = torch.ones_like(tgt_j) if max_attn_len <= 0 else (hist - j <= max_attn_len)
    target_rows_on_history = tgt_i & ~tgt_j & (ctx_j | target_reach)
    same_group = torch.div(i - hist, target_group_size, rounding_mode="floor") == torch.div(
        j - hist, target_group_size, rounding_mode="floor"
    )
    if causal:
        same_group = same_group & (j <= i)
    target_rows_on_targets = tgt_i & tgt_j & same_group
    return in_seq & (history_rows | target_rows_on_history | target_rows_on_targets)
