"""Helpers for jagged (variable-length, concatenated) sequence tensors.

A jagged tensor is ``values[total, ...]`` plus ``offsets[B + 1]`` (sequence ``b`` is
``values[offsets[b]:offsets[b + 1]]``), the layout TorchRec's KeyedJaggedTensor and FBGEMM use. Dense padded
forms are only built where an op needs them (attention scores); the data path never pads.
"""

from __future__ import annotations

# Importing fbgemm_gpu registers torch.ops.fbgemm (jagged <-> padded conversions with autograd).
import fbgemm_gpu  # noqa: F401
import torch


def lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """``[B]`` lengths -> ``[B + 1]`` int64 offsets starting at 0."""
    return torch.ops.fbgemm.asynchronous_complete_cumsum(lengths.to(torch.int64))


def jagged_to_padded(
    values: torch.Tensor, offsets: torch.Tensor, max_len: int, padding_value: float = 0.0
) -> torch.Tensor:
    """``[total, D]`` jagged -> ``[B, max_len, D]`` padded (differentiable)."""
    if values.dim() == 1:  # fbgemm's 1-D variant is for integer ids (int padding)
        return torch.ops.fbgemm.jagged_1d_to_dense(values, offsets, max_len, int(padding_value))
    return torch.ops.fbgemm.jagged_to_padded_dense(values, [offsets], [max_len], padding_value)


def padded_to_jagged(dense: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``[B, N, D]`` padded -> ``[total, D]`` jagged (differentiable); positions past each length are dropped."""
    return torch.ops.fbgemm.dense_to_jagged(dense, [offsets])[0]


def positions_in_sequence(offsets: torch.Tensor, total: int) -> torch.Tensor:
    """Position of every jagged row within its own sequence (0 for each sequence's first token)."""
    lengths = offsets[1:] - offsets[:-1]
    starts = torch.repeat_interleave(offsets[:-1], lengths, output_size=total)
    return torch.arange(total, device=offsets.device) - starts


def last_in_sequence(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Row of the last token of every sequence: ``[B, ...]``. Every sequence must be non-empty."""
    return values[offsets[1:] - 1]


def query_timestamps(timestamps: torch.Tensor, seq_offsets: torch.Tensor, request: torch.Tensor) -> torch.Tensor:
    """Time at which row i of a jagged event sequence predicts: the timestamp of row i + 1 of the same sequence, or
    ``request[b]`` (``[B]``) for the last row of sequence b."""
    n = timestamps.numel()
    if not n:
        return timestamps.clone()
    # No boolean indexing (its nonzero is a device sync on a GPU): an empty sequence's "last row" would be the previous
    # sequence's, so its request time goes to a spare row past the end instead, dropped on return.
    shifted = torch.empty(n + 1, dtype=timestamps.dtype, device=timestamps.device)
    shifted[:n] = torch.roll(timestamps, -1)
    nonempty = seq_offsets[1:] > seq_offsets[:-1]
    last = torch.where(nonempty, seq_offsets[1:] - 1, n)
    shifted.index_put_((last,), request.to(timestamps.dtype))
    return shifted[:n]
