"""Rows of HSTU's relative attention bias for the query rows of a delta-q call (not the whole ``N x N`` square).

``RelativeBucketedTimeAndPositionBias`` builds the padded ``[B, 1, N, N]`` bias of whole sequences; a cached scorer
queries only a few rows (new events, a micro-batch of candidates) against thousands of cached keys, so it builds
``w_pos[pos_k - pos_q] + w_time[bucket(t_q - t_k)]`` for those rows only, from the same module's weights. A test
checks these rows against the module's square.
"""

from __future__ import annotations

import torch

from gr_models.modules.relative_bias import RelativeBucketedTimeAndPositionBias, log_time_buckets


def relative_bias_rows(
    bias: RelativeBucketedTimeAndPositionBias,
    key_timestamps: torch.Tensor,
    key_positions: torch.Tensor,
    query_timestamps: torch.Tensor,
    query_positions: torch.Tensor,
) -> torch.Tensor:
    """``[n_q, n_k]`` bias rows: row ``i`` = query with time ``query_timestamps[i]`` at position
    ``query_positions[i]``, column ``j`` = key ``j``; in the module's parameter dtype. The keys are ``[n_k]`` (one
    sequence) or ``[n_q, n_k]`` (each query row its own keys, e.g. rows of several sequences in one call)."""
    n = bias.max_seq_len
    if key_positions.dim() == 1:
        key_positions, key_timestamps = key_positions.view(1, -1), key_timestamps.view(1, -1)
    rel = (key_positions - query_positions.view(-1, 1)).clamp(1 - n, n - 1) + (n - 1)
    buckets = log_time_buckets(query_timestamps.view(-1, 1) - key_timestamps, bias.num_time_buckets, bias.log_base)
    pos = torch.index_select(bias.position_weights, 0, rel.reshape(-1)).view(rel.shape)
    time = torch.index_select(bias.time_weights, 0, buckets.reshape(-1)).view(buckets.shape)
    return pos + time
