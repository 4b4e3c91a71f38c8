"""Portable PyTorch reference of HSTU attention: forward and an analytic backward.

Computation happens in the input dtype (bf16 inputs give the bf16 reference, the yardstick native kernels are
judged against) on padded ``[B, H, N, N]`` scores. The backward is written out by hand rather than derived by
autograd, so it documents exactly what native backward kernels must compute:

    S = Q K^T (+ rab),  Z = alpha * S,  P = SiLU(Z) * M / N_scale  (M: mask, times the dropout keep-mask / (1-p))
    O = P V
    dV = P^T dO,  dP = dO V^T,  dZ = dP * M / N_scale * SiLU'(Z),  SiLU'(z) = s(z) (1 + z (1 - s(z)))
    dS = alpha dZ,  drab = dS (summed over heads when rab is shared),  dQ = dS K,  dK = dS^T Q
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gr_kernels.masks import hstu_valid_mask


@dataclass(frozen=True)
class MaskSpec:
    causal: bool
    max_attn_len: int
    contextual_seq_len: int
    target_group_size: int


def jagged_index(seq_offsets: torch.Tensor, total: int, max_seq_len: int) -> torch.Tensor:
    """Row of every jagged token in the flattened padded ``[B * max_seq_len]`` layout."""
    offsets = seq_offsets.to(torch.int64)
    lengths = offsets[1:] - offsets[:-1]
    starts = torch.repeat_interleave(offsets[:-1], lengths, output_size=total)
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=total)
    return torch.arange(total, device=offsets.device) - starts + seq * max_seq_len


def _pad(x: torch.Tensor, rows: torch.Tensor, num_seqs: int, n: int) -> torch.Tensor:
    """``[T, H, D]`` -> ``[B, H, N, D]`` with zeros past each length."""
    out = x.new_zeros(num_seqs * n, x.shape[1], x.shape[2]).index_copy_(0, rows, x)
    return out.view(num_seqs, n, x.shape[1], x.shape[2]).transpose(1, 2)


def _unpad(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, D]`` -> ``[T, H, D]``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b * n, h, d).index_select(0, rows)


def _dropout_keep(shape: tuple[int, ...], p: float, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) >= p


class _Scores:
    """Everything forward and backward share: padded inputs, mask, pre-activation Z."""

    def __init__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        seq_offsets: torch.Tensor,
        max_seq_len: int,
        alpha: float,
        mask: MaskSpec,
        num_targets: torch.Tensor | None,
        rab: torch.Tensor | None,
    ) -> None:
        self.num_seqs = seq_offsets.numel() - 1
        self.n = max_seq_len
        self.rows = jagged_index(seq_offsets, q.shape[0], self.n)
        self.qp = _pad(q, self.rows, self.num_seqs, self.n)
        self.kp = _pad(k, self.rows, self.num_seqs, self.n)
        s = self.qp @ self.kp.transpose(-1, -2)
        if rab is not None:
            s = s + rab.to(s.dtype)
        self.z = alpha * s
        lengths = seq_offsets[1:] - seq_offsets[:-1]
        self.valid = hstu_valid_mask(
            lengths,
            self.n,
            causal=mask.causal,
            max_attn_len=mask.max_attn_len,
            contextual_seq_len=mask.contextual_seq_len,
            num_targets=num_targets,
            target_group_size=mask.target_group_size,
        ).unsqueeze(1)

    def weights(self, scale: float, dropout_p: float, dropout_seed: int) -> torch.Tensor:
        """``mask / N_scale`` (times the dropout keep-mask / (1-p)), broadcastable to ``[B, H, N, N]``."""
        w = self.valid.to(self.z.dtype) / scale
        if dropout_p > 0.0:
            keep = _dropout_keep(tuple(self.z.shape), dropout_p, dropout_seed, self.z.device)
            w = w * keep.to(self.z.dtype) / (1.0 - dropout_p)
        return w


def reference_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    scaling_seqlen: int,
    mask: MaskSpec,
    num_targets: torch.Tensor | None,
    rab: torch.Tensor | None,
    dropout_p: float,
    dropout_seed: int,
) -> torch.Tensor:
    if q.shape[0] == 0:
        return v.new_zeros(v.shape)
    sc = _Scores(q, k, seq_offsets, max_seq_len, alpha, mask, num_targets, rab)
    vp = _pad(v, sc.rows, sc.num_seqs, sc.n)
    p = torch.nn.functional.silu(sc.z) * sc.weights(scaling_seqlen, dropout_p, dropout_seed)
    return _unpad(p @ vp, sc.rows)


def reference_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    scaling_seqlen: int,
    mask: MaskSpec,
    num_targets: torch.Tensor | None,
    rab: torch.Tensor | None,
    dropout_p: float,
    dropout_seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if q.shape[0] == 0:
        drab = None if rab is None else torch.zeros_like(rab)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), drab
    sc = _Scores(q, k, seq_offsets, max_seq_len, alpha, mask, num_targets, rab)
    vp = _pad(v, sc.rows, sc.num_seqs, sc.n)
    dop = _pad(grad_out.to(v.dtype), sc.rows, sc.num_seqs, sc.n)
    w = sc.weights(scaling_seqlen, dropout_p, dropout_seed)
    sig = torch.sigmoid(sc.z)
    p = sc.z * sig * w
    dv = p.transpose(-1, -2) @ dop
    dz = (dop @ vp.transpose(-1, -2)) * w * sig * (1 + sc.z * (1 - sig))
    ds = alpha * dz
    dq = ds @ sc.kp
    dk = ds.transpose(-1, -2) @ sc.qp
    drab = None
    if rab is not None:
        drab = (ds.sum(dim=1, keepdim=True) if rab.shape[1] == 1 else ds).to(rab.dtype)
    return (
        _unpad(dq, sc.rows),
        _unpad(dk, sc.rows),
        _unpad(dv, sc.rows),
        drab,
    )
