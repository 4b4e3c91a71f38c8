"""Plain-data descriptions of one ``hstu_attention`` call, shared by the ops, the reference and native backends."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HSTUParams:
    """The non-tensor arguments every backend's ``forward``/``backward`` receives.

    ``scaling_seqlen`` is already resolved (``N`` of ``O = (SiLU(alpha (Q K^T + rab)) * mask) V / N``);
    ``dropout_p`` is 0 when not training; ``dropout_seed`` seeds the generator the dropout keep-mask is drawn from,
    so forward and backward see the same mask. ``max_q_len`` is 0 unless the call is delta q (``q_offsets``
    given): then it is the padded number of query rows per sequence, >= every ``q_offsets[b + 1] - q_offsets[b]``
    (the caller's ``max_q_len``, else ``min(total_q, max_seq_len)``).
    """

    max_seq_len: int
    alpha: float
    scaling_seqlen: int
    causal: bool = True
    max_attn_len: int = 0
    contextual_seq_len: int = 0
    target_group_size: int = 1
    dropout_p: float = 0.0
    dropout_seed: int = 0
    max_q_len: int = 0


@dataclass(frozen=True)
class AttentionCall:
    """What ``supports(call)`` gets to decide whether a backend can run a call: metadata only, no tensor values
    (reading values would cost a device sync on every call)."""

    params: HSTUParams
    device: torch.device
    dtype: torch.dtype
    num_heads: int
    attention_dim: int
    hidden_dim: int
    offsets_dtype: torch.dtype
    has_targets: bool
    rab_heads: int  # 0 without rab, else 1 (shared over heads) or num_heads
    requires_grad: bool
    delta_q: bool = False  # q_offsets given: q holds only the last tokens of each sequence (incremental inference)
