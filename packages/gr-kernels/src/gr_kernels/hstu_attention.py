"""Public entry point: ``gr_kernels.hstu_attention`` on jagged ``[total_tokens, heads, dim]`` tensors."""

from __future__ import annotations

import math

import torch

from gr_kernels import ops  # noqa: F401  (registers the custom ops)
from gr_kernels.backends import AttentionCall, resolve_backend


def _check_structure(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    scaling_seqlen: int | None,
    max_attn_len: int,
    contextual_seq_len: int,
    num_targets: torch.Tensor | None,
    target_group_size: int,
    rab: torch.Tensor | None,
    dropout_p: float,
) -> None:
    """Shape/dtype/device/scalar checks: no tensor values are read, so no device sync."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be [total_tokens, heads, dim], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must be [total_tokens={q.shape[0]}, heads={q.shape[1]}, hidden_dim], got {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if seq_offsets.dim() != 1 or seq_offsets.numel() < 1 or seq_offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"seq_offsets must be a 1-D int32/int64 tensor [B + 1], got {seq_offsets.dtype} {tuple(seq_offsets.shape)}"
        )
    devices = {t.device for t in (q, k, v, seq_offsets, num_targets, rab) if t is not None}
    if len(devices) != 1:
        raise ValueError(
            f"q, k, v, seq_offsets, num_targets and rab must be on one device, got {sorted(map(str, devices))}"
        )
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    if scaling_seqlen is not None and scaling_seqlen < 1:
        raise ValueError(f"scaling_seqlen must be >= 1, got {scaling_seqlen}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    if max_attn_len < 0:
        raise ValueError(f"max_attn_len must be >= 0 (0 = no local window), got {max_attn_len}")
    if contextual_seq_len < 0:
        raise ValueError(f"contextual_seq_len must be >= 0, got {contextual_seq_len}")
    if target_group_size < 1:
        raise ValueError(f"target_group_size must be >= 1, got {target_group_size}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    num_seqs = seq_offsets.numel() - 1
    if num_targets is not None and (num_targets.shape != (num_seqs,) or num_targets.is_floating_point()):
        raise ValueError(
            f"num_targets must be an integer tensor [B={num_seqs}], got {num_targets.dtype} {tuple(num_targets.shape)}"
        )
    if rab is not None:
        if (
            rab.dim() != 4
            or rab.shape[0] != num_seqs
            or rab.shape[1] not in (1, q.shape[1])
            or rab.shape[2:]
            != (
                max_seq_len,
                max_seq_len,
            )
        ):
            raise ValueError(
                f"rab must be [B={num_seqs}, 1 or heads={q.shape[1]}, max_seq_len={max_seq_len}, "
                f"max_seq_len={max_seq_len}], got {tuple(rab.shape)}"
            )
        if not rab.is_floating_point():
            raise TypeError(f"rab must be floating point, got {rab.dtype}")


def _check_values(
    q: torch.Tensor, seq_offsets: torch.Tensor, max_seq_len: int, num_targets: torch.Tensor | None
) -> None:
    """Checks that read tensor values (a host sync on GPU; skip with validate=False)."""
    offsets = seq_offsets.detach().to("cpu", torch.int64)
    if int(offsets[0]) != 0 or int(offsets[-1]) != q.shape[0]:
        raise ValueError(
            f"seq_offsets must start at 0 and end at total_tokens={q.shape[0]}, got "
            f"{int(offsets[0])}..{int(offsets[-1])}"
        )
    lengths = offsets[1:] - offsets[:-1]
    if (lengths < 0).any():
        raise ValueError(f"seq_offsets must be non-decreasing (sequence {int(torch.argmax((lengths < 0).int()))})")
    if lengths.numel() and int(lengths.max()) > max_seq_len:
        b = int(torch.argmax(lengths))
        raise ValueError(f"sequence {b} has length {int(lengths[b])} > max_seq_len={max_seq_len}")
    if num_targets is not None:
        t = num_targets.detach().to("cpu", torch.int64)
        bad = (t < 0) | (t > lengths)
        if bad.any():
            b = int(torch.argmax(bad.int()))
            raise ValueError(f"num_targets[{b}]={int(t[b])} must lie in [0, length={int(lengths[b])}]")


def hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    *,
    alpha: float,
    scaling_seqlen: int | None = None,
    causal: bool = True,
    max_attn_len: int = 0,
    contextual_seq_len: int = 0,
    num_targets: torch.Tensor | None = None,
    target_group_size: int = 1,
    rab: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """HSTU attention over jagged sequences: ``O = (SiLU(alpha * (Q K^T + rab)) * mask) V / N``.

    Args:
        q, k: ``[total_tokens, heads, attention_dim]``; v: ``[total_tokens, heads, hidden_dim]``; sequence ``b`` is
            rows ``seq_offsets[b]:seq_offsets[b + 1]``.
        seq_offsets: int32/int64 ``[B + 1]``, from 0 to total_tokens.
        max_seq_len: upper bound on every length; also the size of ``rab``'s last two dimensions.
        alpha: scale of ``Q K^T + rab`` before the SiLU.
        scaling_seqlen: the ``N`` the output is divided by; default ``max_seq_len``.
        causal, max_attn_len, contextual_seq_len, num_targets, target_group_size: the mask, see
            ``gr_kernels.masks`` (``max_attn_len=0``: no window; ``num_targets``: int ``[B]`` candidates at the end
            of each sequence).
        rab: optional relative attention bias ``[B, 1 or heads, max_seq_len, max_seq_len]``; receives a gradient.
        dropout_p: attention dropout on the masked weights, applied when ``training``; the mask is drawn from a
            seed taken from torch's default generator, so ``torch.manual_seed`` makes it reproducible.
        backend: "auto" (the best registered backend that supports the call) or a registered name.
        validate: also run the checks that read tensor values (a device sync on GPU).

    Returns ``[total_tokens, heads, hidden_dim]`` in q's dtype. Empty sequences and an empty batch are allowed.
    """
    _check_structure(q, k, v, seq_offsets, max_seq_len, alpha, scaling_seqlen, max_attn_len, contextual_seq_len,
                     num_targets, target_group_size, rab, dropout_p)  # fmt: skip
    if validate:
        _check_values(q, seq_offsets, max_seq_len, num_targets)
    p = dropout_p if training else 0.0
    call = AttentionCall(
        device=q.device,
        dtype=q.dtype,
        num_heads=q.shape[1],
        attention_dim=q.shape[2],
        hidden_dim=v.shape[2],
        max_seq_len=max_seq_len,
        causal=causal,
        max_attn_len=max_attn_len,
        contextual_seq_len=contextual_seq_len,
        has_targets=num_targets is not None,
        target_group_size=target_group_size,
        has_rab=rab is not None,
        rab_heads=0 if rab is None else rab.shape[1],
        dropout_p=p,
        requires_grad=torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, rab) if t is not None),
    )
    name = resolve_backend(backend, call)
    seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0.0 else 0
    return torch.ops.gr_kernels.hstu_attention_fwd(
        q, k, v, seq_offsets, max_seq_len, float(alpha), int(scaling_seqlen or max_seq_len), causal, max_attn_len,
        contextual_seq_len, num_targets, target_group_size, rab, float(p), seed, name,
    )  # fmt: skip
