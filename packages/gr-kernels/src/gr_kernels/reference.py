"""Portable PyTorch reference of HSTU attention: forward and an analytic backward.

Everything is computed in the input dtype (bf16 inputs give the bf16 reference that native kernels are judged
against; fp32 inputs give fp32 math) on padded ``[B, H, N, N]`` scores, ``N = max_seq_len``. The backward is
written out by hand rather than derived by autograd, so it spells out what native backward kernels compute:

    S = Q K^T (+ rab),  Z = alpha S,  W = M / N_scale  (M: mask; times keep / (1 - p) under dropout)
    A = SiLU(Z) W,  O = A V
    dV = A^T dO,  dA = dO V^T,  dZ = dA W SiLU'(Z),  SiLU'(z) = s(z) (1 + z (1 - s(z))),  s = sigmoid
    dS = alpha dZ,  drab = dS (summed over heads when rab is shared),  dQ = dS K,  dK = dS^T Q

Delta q (``q_offsets`` given): Q is padded to ``[B, H, Nq, D]``, ``Nq = params.max_q_len``, row ``r`` of sequence
``b`` holding its query ``r``, which sits at position ``P[b, r] = L_b - Q_b + r`` (the queries are the last ``Q_b``
tokens). The formulas above then run on ``[B, H, Nq, N]`` scores: the mask rows are those of the queries' positions
(``hstu_valid_mask(..., q_lengths=...)``), the bias rows ``rab[:, :, P]`` are gathered and ``drab`` is scattered back
into those rows (zero elsewhere), and under dropout the keep-mask is the full ``[B, H, N, N]`` one drawn from the same
seed, gathered at ``P``, so each query row equals the same row of the full-sequence computation.
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
    """What forward and backward share: padded Q/K, the pre-activation ``Z`` and the weights ``W``.

    Without ``q_offsets`` the queries are every position (``Nq = N``); with it, ``Nq = params.max_q_len`` rows per
    sequence and ``positions`` ``[B, Nq]`` says where each query row sits (see the module docstring).
    """

    def __init__(
        self,
        q: Tensor,
        k: Tensor,
        seq_offsets: Tensor,
        num_targets: Tensor | None,
        rab: Tensor | None,
        p: HSTUParams,
        q_offsets: Tensor | None,
    ) -> None:
        self.num_seqs = seq_offsets.numel() - 1
        n = p.max_seq_len
        lengths = seq_offsets[1:] - seq_offsets[:-1]
        self.kv_rows = jagged_rows(seq_offsets, k.shape[0], n)
        self.positions: Tensor | None = None
        q_lengths = None
        if q_offsets is None:
            self.num_q_rows, self.q_rows = n, self.kv_rows
        else:
            if p.max_q_len < 1:  # hstu_attention always sets it; direct callers of the reference must too
                raise ValueError(f"delta q (q_offsets) needs params.max_q_len >= 1, got {p.max_q_len}")
            self.num_q_rows = p.max_q_len
            self.q_rows = jagged_rows(q_offsets, q.shape[0], self.num_q_rows)
            q_lengths = q_offsets[1:] - q_offsets[:-1]
            first = (lengths - q_lengths).to(torch.int64).view(-1, 1)
            self.positions = first + torch.arange(self.num_q_rows, device=first.device).view(1, -1)
        self.q = _pad(q, self.q_rows, self.num_seqs, self.num_q_rows)
        self.k = _pad(k, self.kv_rows, self.num_seqs, n)
        s = self.q @ self.k.transpose(-1, -2)
        if rab is not None:
            s = s + self.query_rows(rab)  # [B, 1 or H, Nq, N] broadcasts over heads
        self.z = p.alpha * s
        mask = hstu_valid_mask(
            lengths,
            n,
            causal=p.causal,
            max_attn_len=p.max_attn_len,
            contextual_seq_len=p.contextual_seq_len,
            num_targets=num_targets,
            target_group_size=p.target_group_size,
            q_lengths=q_lengths,
            max_q_len=self.num_q_rows,
        ).unsqueeze(1)
        w = mask.to(self.z.dtype) / p.scaling_seqlen
        if p.dropout_p > 0.0:
            # Drawn at the full [B, H, N, N] shape whatever the queries, so delta q keeps full attention's rows.
            full = (self.num_seqs, self.z.shape[1], n, n)
            keep = self.query_rows(dropout_keep_mask(full, p.dropout_p, p.dropout_seed, self.z.device))
            w = w * keep.to(w.dtype) / (1.0 - p.dropout_p)
        self.w = w

    def _row_index(self, x: Tensor) -> Tensor:
        # Padding rows (r >= Q_b) may point past the sequence, or before it on invalid input; their weights are 0.
        pos = self.positions.clamp(0, x.shape[2] - 1)  # type: ignore[union-attr]
        return pos.view(self.num_seqs, 1, self.num_q_rows, 1).expand(x.shape[0], x.shape[1], -1, x.shape[3])

    def query_rows(self, x: Tensor) -> Tensor:
        """``[B, h, N, N]`` indexed by query position -> ``[B, h, Nq, N]``, one row per padded query row."""
        return x if self.positions is None else x.gather(2, self._row_index(x))

    def scatter_query_rows(self, x: Tensor) -> Tensor:
        """Inverse of ``query_rows`` for gradients: ``[B, h, Nq, N]`` -> ``[B, h, N, N]``, zero on non-query rows.

        Adds rather than copies: padding rows may share a clamped position with a query row, and add zeros.
        """
        if self.positions is None:
            return x
        n = self.k.shape[2]
        out = x.new_zeros(x.shape[0], x.shape[1], n, n)
        return out.scatter_add_(2, self._row_index(out), x)

    def pad_q(self, x: Tensor) -> Tensor:
        """A ``[total_q, H, D]`` tensor laid out like the queries (the output gradient) -> ``[B, H, Nq, D]``."""
        return _pad(x, self.q_rows, self.num_seqs, self.num_q_rows)

    def pad_kv(self, x: Tensor) -> Tensor:
        return _pad(x, self.kv_rows, self.num_seqs, self.k.shape[2])


def reference_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    num_targets: Tensor | None,
    rab: Tensor | None,
    p: HSTUParams,
    q_offsets: Tensor | None = None,
) -> Tensor:
    """``[total_q, heads, hidden_dim]`` output of HSTU attention (see the module docstring); ``total_q`` is
    ``total_tokens`` without ``q_offsets``."""
    if q.shape[0] == 0:
        return v.new_zeros(q.shape[0], v.shape[1], v.shape[2])
    sc = _Scores(q, k, seq_offsets, num_targets, rab, p, q_offsets)
    a = torch.nn.functional.silu(sc.z) * sc.w
    return _unpad(a @ sc.pad_kv(v), sc.q_rows)


def reference_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    num_targets: Tensor | None,
    rab: Tensor | None,
    p: HSTUParams,
    q_offsets: Tensor | None = None,
    need_drab: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(dq, dk, dv, drab)``, ``drab`` None without rab or with ``need_drab=False``; recomputes the scores instead
    of saving them."""
    need_drab = need_drab and rab is not None
    if q.shape[0] == 0:
        return (
            torch.zeros_like(q),
            torch.zeros_like(k),
            torch.zeros_like(v),
            torch.zeros_like(rab) if need_drab else None,
        )
    sc = _Scores(q, k, seq_offsets, num_targets, rab, p, q_offsets)
    vp = sc.pad_kv(v)
    dout = sc.pad_q(grad_out.to(v.dtype))
    sig = torch.sigmoid(sc.z)
    a = sc.z * sig * sc.w
    dv = a.transpose(-1, -2) @ dout
    dz = (dout @ vp.transpose(-1, -2)) * sc.w * sig * (1 + sc.z * (1 - sig))
    ds = p.alpha * dz
    dq = ds @ sc.k
    dk = ds.transpose(-1, -2) @ sc.q
    drab = None
    if need_drab:
        drab = ds.sum(dim=1, keepdim=True) if rab.shape[1] == 1 and ds.shape[1] != 1 else ds
        drab = sc.scatter_query_rows(drab)
    return _unpad(dq, sc.q_rows), _unpad(dk, sc.kv_rows), _unpad(dv, sc.kv_rows), drab


class ReferenceBackend:
    """The built-in ``"reference"`` backend: runs everything, always considered last by ``backend="auto"``.

    Native backends may subclass it to inherit the reference backward while providing their own forward.
    Supports delta q (``q_offsets``).
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
        q_offsets: Tensor | None = None,
    ) -> Tensor:
        return reference_forward(q, k, v, seq_offsets, num_targets, rab, params, q_offsets)

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
        q_offsets: Tensor | None = None,
        need_drab: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        return reference_backward(grad_out, q, k, v, seq_offsets, num_targets, rab, params, q_offsets, need_drab)
