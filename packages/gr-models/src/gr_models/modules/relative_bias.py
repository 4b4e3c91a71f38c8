"""Relative attention bias from token positions and log-bucketed time gaps (HSTU's rab)."""

from __future__ import annotations

import math

import torch
from torch import nn

from gr_models.jagged import jagged_to_padded

# Bias rows padded to a multiple of this many elements (16 bytes in bf16/fp16) let the Hopper attention kernel load
# them through TMA instead of per-thread loads (about 3x faster there); the op takes max_seq_len as an upper bound,
# so a batch's bias side may be rounded up to it (``aligned_bias_len``).
RAB_ROW_ALIGN = 8


def aligned_bias_len(max_seq_len: int, limit: int) -> int:
    """``max_seq_len`` rounded up to ``RAB_ROW_ALIGN``, but at most ``limit`` (the bias table's own length)."""
    return max(max_seq_len, min(-(-max_seq_len // RAB_ROW_ALIGN) * RAB_ROW_ALIGN, limit))


def log_time_buckets(time_delta: torch.Tensor, num_buckets: int, log_base: float = math.exp(0.301)) -> torch.Tensor:
    """Bucket index of a time gap: ``floor(log_base(max(|dt|, 1)))`` clipped to ``[0, num_buckets]``.

    Gaps of 0 or 1 second fall into bucket 0; each bucket spans a factor of ``log_base`` (about 1.35 by default,
    so 128 buckets cover gaps beyond 10^16 s: in practice the clip only guards against garbage timestamps).
    """
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    if log_base <= 1.0:
        raise ValueError(f"log_base must be > 1, got {log_base}")
    gaps = time_delta.abs().clamp(min=1).to(torch.float32)
    return (torch.log(gaps) / math.log(log_base)).floor().to(torch.int64).clamp(0, num_buckets)


class RelativeBucketedTimeAndPositionBias(nn.Module):
    """``rab[b, 0, i, j] = w_pos[j - i] + w_time[bucket(t_query[i] - t[j])]`` on padded ``[B, 1, N, N]``.

    ``t_query[i]`` is the time at which the prediction of row ``i`` is made: the timestamp of the next event
    (the target's timestamp, i.e. the request time at serving), so the model knows how long after each history
    event the recommendation is asked for. The bias is shared by all heads.
    """

    def __init__(self, max_seq_len: int, num_time_buckets: int = 128, log_base: float = math.exp(0.301)) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.num_time_buckets = num_time_buckets
        self.log_base = log_base
        self.position_weights = nn.Parameter(torch.empty(2 * max_seq_len - 1).normal_(std=0.02))
        self.time_weights = nn.Parameter(torch.empty(num_time_buckets + 1).normal_(std=0.02))

    def forward(
        self,
        timestamps: torch.Tensor,
        query_timestamps: torch.Tensor,
        seq_offsets: torch.Tensor,
        max_seq_len: int,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``timestamps``/``query_timestamps``: jagged ``[total]`` int64. Returns ``[B, 1, N, N]``, N = max_seq_len.

        ``positions`` (jagged ``[total]`` int64 in ``[0, max_seq_len)``) replaces each token's index in the
        position term (``w_pos[pos[j] - pos[i]]``); ranking gives all candidates one position so that their order
        does not matter."""
        if max_seq_len > self.max_seq_len:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the bias table's {self.max_seq_len}")
        n = max_seq_len
        key_t = jagged_to_padded(timestamps, seq_offsets, n)
        query_t = jagged_to_padded(query_timestamps, seq_offsets, n)
        buckets = log_time_buckets(query_t.unsqueeze(2) - key_t.unsqueeze(1), self.num_time_buckets, self.log_base)
        if positions is None:
            idx = torch.arange(n, device=timestamps.device)
            rel = idx.view(1, n) - idx.view(n, 1) + self.max_seq_len - 1  # j - i, shifted to be >= 0
            rel_shape: tuple[int, ...] = (1, n, n)
        else:
            padded = jagged_to_padded(positions, seq_offsets, n)
            rel = (padded.unsqueeze(1) - padded.unsqueeze(2)).clamp(1 - self.max_seq_len, self.max_seq_len - 1)
            rel = rel + self.max_seq_len - 1
            rel_shape = tuple(rel.shape)
        # index_select, not advanced indexing: its backward is a plain index_add, ~6x faster on CPU than the
        # sorted accumulate of ``w[idx]`` on a [B, N, N] index.
        pos = torch.index_select(self.position_weights, 0, rel.reshape(-1)).view(rel_shape)
        time = torch.index_select(self.time_weights, 0, buckets.reshape(-1)).view(buckets.shape)
        return (pos + time).unsqueeze(1)
