"""Portable PyTorch reference of HSTU attention: forward and an analytic backward.

Everything is computed in the input dtype (bf16 inputs give the bf16 reference that native kernels are judged
against; fp32 inputs give fp32 math) on padded ``[B, H, N, N]`` scores, ``N = max_seq_len``. The backward is
written out by hand rather than derived by autograd, so it spells out what native backward kernels compute:

    S = Q K^T (+ rab),  Z = alpha S,  W = M / N_scale  (M: mask; times keep / (1 - p) under dropout)
    A = SiLU(Z) W,  O = A V
    dV = A^T dO,  dA = dO V^T,  dZ = dA W SiLU'(Z),  SiLU'(z) = s(z) (1 + z (1 - s(z))),  s = sigmoid
    dS = alpha dZ,  drab = dS (summed over heads when rab is shared),  dQ = dS K,  dK = dS^T Q
"""

from __future__ import annotations

import torch
from torch import Tensor

from gr_kernels.masks import hstu_valid_mask
from gr_kernels.params import AttentionCall, HSTUParams


def jagged_rows(seq_offsets: Tensor, total_tokens: int, max_seq_len: int) -> Tensor:
    """Row of each jagged token in the padded ``[B * max_seq_len]`` layout (no host sync: sizes are given)."""
    offsets = seq_offsets.to(torch.int64)
    lengths = offsets[1:] - offsets[:-1]
    starts = torch.repeat_interleave(offsets[:-1], lengths, output_size=total_tokens)
    seq = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=total_tokens
    )
    return torch.arange(total_tokens, device=offsets.device) - starts + seq * max_seq_len


def _pad(x: Tensor, rows: Tensor, num_seqs: int, n: int) -> Tensor:
    """``[T, H, D]`` -> ``[B, H, N, D]``, zeros past each length."""
    out = x.new_zeros(num_seqs * n, x.shape[1], x.shape[2]).index_copy_(0, rows, x)
    return out.view(num_seqs, n, x.shape[1], x.shape[2]).transpose(1, 2)


def _unpad(x: Tensor, rows: Tensor) -> Tensor:
    """``[B, H, N, D]`` -> ``[T, H, D]``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b * n, h, d).index_select(0, rows)


def dropout_keep_mask(shape: tuple[int, ...], p: float, seed: int, device: torch.device) -> Tensor:
    """Boolean keep-mask drawn from a fresh generator seeded with ``seed``: the backward regenerates it exactly."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) >= p


class _Scores:
    """What forward and backward share: padded Q/K, the pre-activation ``Z`` and the weights ``W``."""

    def __init__(
        self, q: Tensor, k: Tensor, seq_offsets: Tensor, num_targets: Tensor | None, rab: Tensor | None, p: HSTUParams
    ) -> None:
        self.num_seqs = seq_offsets.numel() - 1
        n = p.max_seq_len
        self.rows = jagged_rows(seq_offsets, q.shape[0], n)
        self.q = _pad(q, self.rows, self.num_seqs, n)
        self.k = _pad(k, self.rows, self.num_seqs, n)
        s = self.q @ self.k.transpose(-1, -2)
        if rab is not None:
            s = s + rab  # [B, 1 or H, N, N] broadcasts over heads
        self.z = p.alpha * s
        mask = hstu_valid_mask(
            seq_offsets[1:] - seq_offsets[:-1],
            n,
            causal=p.causal,
            max_attn_len=p.max_attn_len,
            contextual_seq_len=p.contextual_seq_len,
            num_targets=num_targets,
            target_group_size=p.target_group_size,
        ).unsqueeze(1)
        w = mask.to(self.z.dtype) / p.scaling_seqlen
        if p.dropout_p > 0.0:
            keep = dropout_keep_mask(tuple(self.z.shape), p.dropout_p, p.dropout_seed, self.z.device)
            w = w * keep.to(w.dtype) / (1.0 - p.dropout_p)
        self.w = w

    def pad(self, x: Tensor) -> Tensor:
        return _pad(x, self.rows, self.num_seqs, self.w.shape[-1])


def reference_forward(
    q: Tensor, k: Tensor, v: Tensor, seq_offsets: Tensor, num_targets: Tensor | None, rab: Tensor | None, p: HSTUParams
) -> Tensor:
    """``[total_tokens, heads, hidden_dim]`` output of HSTU attention (see the module docstring)."""
    if q.shape[0] == 0:
        return v.new_zeros(v.shape)
    sc = _Scores(q, k, seq_offsets, num_targets, rab, p)
    a = torch.nn.functional.silu(sc.z) * sc.w
    return _unpad(a @ sc.pad(v), sc.rows)


def reference_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    num_targets: Tensor | None,
    rab: Tensor | None,
    p: HSTUParams,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(dq, dk, dv, drab)``, ``drab`` None without rab; recomputes the scores instead of saving them."""
    if q.shape[0] == 0:
        return (
            torch.zeros_like(q),
            torch.zeros_like(k),
            torch.zeros_like(v),
            None if rab is None else torch.zeros_like(rab),
        )
    sc = _Scores(q, k, seq_offsets, num_targets, rab, p)
    vp = sc.pad(v)
    dout = sc.pad(grad_out.to(v.dtype))
    sig = torch.sigmoid(sc.z)
    a = sc.z * sig * sc.w
    dv = a.transpose(-1, -2) @ dout
    dz = (dout @ vp.transpose(-1, -2)) * sc.w * sig * (1 + sc.z * (1 - sig))
    ds = p.alpha * dz
    dq = ds @ sc.k
    dk = ds.transpose(-1, -2) @ sc.q
    drab = None
    if rab is not None:
        drab = ds.sum(dim=1, keepdim=True) if rab.shape[1] == 1 and ds.shape[1] != 1 else ds
    return _unpad(dq, sc.rows), _unpad(dk, sc.rows), _unpad(dv, sc.rows), drab


class ReferenceBackend:
    """The built-in ``"reference"`` backend: runs everything, always considered last by ``backend="auto"``.

    Native backends may subclass it to inherit the reference backward while providing their own forward.
    """

    priority: int = 0

    def supports(self, call: AttentionCall) -> str | None:
        return None

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        seq_offsets: Tensor,
        num_targets: Tensor | None,
        rab: Tensor | None,
        params: HSTUParams,
    ) -> Tensor:
        return reference_forward(q, k, v, seq_offsets, num_targets, rab, params)

    def backward(
        self,
        grad_out: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        seq_offsets: Tensor,
        num_targets: Tensor | None,
        rab: Tensor | None,
        params: HSTUParams,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        return reference_backward(grad_out, q, k, v, seq_offsets, num_targets, rab, params)
