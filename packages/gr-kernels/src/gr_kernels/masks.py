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
    """Boolean ``[B, N, N]`` mask, ``N = max_seq_len``: ``mask[b, i, j]`` = query ``i`` may attend key ``j``.

    ``lengths`` and ``num_targets`` are integer ``[B]`` tensors; their values are not read on the host, so this
    builds without a device sync.
    """
    n = max_seq_len
    device = lengths.device
    length = lengths.to(torch.int64).view(-1, 1, 1)
    i = torch.arange(n, device=device).view(1, n, 1)
    j = torch.arange(n, device=device).view(1, 1, n)
    in_seq = (i < length) & (j < length)

    near = (j <= i) if causal else torch.ones(1, n, n, dtype=torch.bool, device=device)
    if max_attn_len > 0:
        near = near & ((i - j).abs() <= max_attn_len)
    if num_targets is None and contextual_seq_len == 0:
        # Plain sequences: one [N, N] pattern shared by all, cut at each length.
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
