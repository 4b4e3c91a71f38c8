"""Public entry point: ``gr_kernels.hstu_attention`` on jagged ``[total_tokens, heads, dim]`` tensors.

Full attention (every token a query) by default; with ``q_offsets``, delta q: the queries are only the last tokens
of each sequence (new events attending to a cached history plus themselves, for incremental inference).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gr_kernels import ops
from gr_kernels.backends import resolve_backend
from gr_kernels.params import AttentionCall, HSTUParams

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_INDEX = (torch.int32, torch.int64)


def _is_int(x: object) -> bool:
    # SymInt: dynamic shapes under torch.compile; bool is an int subclass but never a meaningful length.
    return isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)


def _check_structure(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    max_seq_len: int,
    alpha: float,
    scaling_seqlen: int | None,
    max_attn_len: int,
    contextual_seq_len: int,
    num_targets: Tensor | None,
    target_group_size: int,
    rab: Tensor | None,
    dropout_p: float,
    q_offsets: Tensor | None,
    max_q_len: int | None,
) -> None:
    """Shape, dtype, device and scalar checks. They read no tensor values, so they never sync a device."""
    if q_offsets is not None and not isinstance(q_offsets, Tensor):
        raise TypeError(f"q_offsets must be None or a torch.Tensor, got {type(q_offsets).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v), ("seq_offsets", seq_offsets)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be [total_tokens, heads, dim], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if q_offsets is None and k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if q_offsets is not None and k.shape[1:] != q.shape[1:]:
        # Delta q: k/v hold every token, q only the last ones of each sequence.
        raise ValueError(
            f"k must be [total_tokens, heads={q.shape[1]}, attn_dim={q.shape[2]}] like q, got {tuple(k.shape)}"
        )
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"v must be [total_tokens={k.shape[0]}, heads={k.shape[1]}, hidden_dim], got {tuple(v.shape)}")
    if q.shape[1] < 1 or q.shape[2] < 1 or v.shape[2] < 1:
        raise ValueError(f"heads and dims must be >= 1, got q {tuple(q.shape)}, v {tuple(v.shape)}")
    if seq_offsets.dim() != 1 or seq_offsets.numel() < 1 or seq_offsets.dtype not in _INDEX:
        raise ValueError(
            f"seq_offsets must be a 1-D int32/int64 tensor [B + 1], got {seq_offsets.dtype} {tuple(seq_offsets.shape)}"
        )
    if q_offsets is not None and (
        q_offsets.dim() != 1 or q_offsets.dtype not in _INDEX or q_offsets.shape != seq_offsets.shape
    ):
        raise ValueError(
            f"q_offsets must be a 1-D int32/int64 tensor [B + 1 = {seq_offsets.numel()}] like seq_offsets, got "
            f"{q_offsets.dtype} {tuple(q_offsets.shape)}"
        )
    others = (("k", k), ("v", v), ("seq_offsets", seq_offsets), ("num_targets", num_targets), ("rab", rab),
              ("q_offsets", q_offsets))  # fmt: skip
    for name, t in others:
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all tensors must share a device")

    if not _is_int(max_seq_len) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be an int >= 1, got {max_seq_len!r}")
    if scaling_seqlen is not None and (not _is_int(scaling_seqlen) or scaling_seqlen < 1):
        raise ValueError(f"scaling_seqlen must be None or an int >= 1, got {scaling_seqlen!r}")
    if not isinstance(alpha, (int, float, torch.SymFloat)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite float, got {alpha!r}")
    if not _is_int(max_attn_len) or max_attn_len < 0:
        raise ValueError(f"max_attn_len must be an int >= 0 (0 = no local window), got {max_attn_len!r}")
    if not _is_int(contextual_seq_len) or contextual_seq_len < 0:
        raise ValueError(f"contextual_seq_len must be an int >= 0, got {contextual_seq_len!r}")
    if not _is_int(target_group_size) or target_group_size < 1:
        raise ValueError(f"target_group_size must be an int >= 1, got {target_group_size!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if max_q_len is not None:
        if q_offsets is None:
            raise ValueError("max_q_len is only meaningful with q_offsets (delta q); pass neither or both")
        if not _is_int(max_q_len) or not 1 <= max_q_len <= max_seq_len:
            raise ValueError(f"max_q_len must be an int in [1, max_seq_len={max_seq_len}], got {max_q_len!r}")

    num_seqs = seq_offsets.numel() - 1
    if num_targets is not None and (
        not isinstance(num_targets, Tensor) or num_targets.dtype not in _INDEX or num_targets.shape != (num_seqs,)
    ):
        got = f"{num_targets.dtype} {tuple(num_targets.shape)}" if isinstance(num_targets, Tensor) else num_targets
        raise ValueError(f"num_targets must be an int32/int64 tensor [B={num_seqs}], got {got}")
    if rab is not None:
        if not isinstance(rab, Tensor):
            raise TypeError(f"rab must be None or a torch.Tensor, got {type(rab).__name__}")
        if (
            rab.dim() != 4
            or rab.shape[0] != num_seqs
            or rab.shape[1] not in (1, q.shape[1])
            or rab.shape[2] != max_seq_len
            or rab.shape[3] != max_seq_len
        ):
            # Formatted only here: under torch.compile the sizes are symbolic, and formatting one specialises it
            # (or breaks the graph).
            want = f"[B={num_seqs}, 1 or heads={q.shape[1]}, max_seq_len={max_seq_len}, max_seq_len={max_seq_len}]"
            raise ValueError(f"rab must be {want}, got {tuple(rab.shape)}")
        if rab.dtype not in _FLOATS:
            raise TypeError(f"rab must be float32, float64, bfloat16 or float16, got {rab.dtype}")


def check_attention_values(
    q: Tensor,
    k: Tensor,
    seq_offsets: Tensor,
    max_seq_len: int,
    num_targets: Tensor | None,
    q_offsets: Tensor | None,
    max_q_len: int,
) -> None:
    """The checks of ``hstu_attention`` that read tensor values (offsets, lengths against ``max_seq_len``, target
    counts; one device-to-host copy, a sync on GPU): what ``validate=True`` runs, and what a caller running the op
    with ``validate=False`` (e.g. inside a compiled graph, which cannot read values) runs beforehand instead."""
    parts = [seq_offsets.detach().to(torch.int64)]
    if q_offsets is not None:
        parts.append(q_offsets.detach().to(torch.int64))
    if num_targets is not None:
        parts.append(num_targets.detach().to(torch.int64))
    values = torch.cat(parts).cpu()
    num_seqs = seq_offsets.numel() - 1
    offsets, values = values[: num_seqs + 1], values[num_seqs + 1 :]
    lengths = _check_offsets("seq_offsets", offsets, k.shape[0], "total_tokens")
    if (lengths > max_seq_len).any():
        b = int(torch.nonzero(lengths > max_seq_len)[0])
        raise ValueError(f"sequence {b} has length {int(lengths[b])} > max_seq_len={max_seq_len}")
    if q_offsets is not None:
        q_lengths = _check_offsets("q_offsets", values[: num_seqs + 1], q.shape[0], "total_q = q.shape[0]")
        values = values[num_seqs + 1 :]
        if (q_lengths > lengths).any():
            b = int(torch.nonzero(q_lengths > lengths)[0])
            raise ValueError(
                f"sequence {b} has {int(q_lengths[b])} queries (q_offsets) but only {int(lengths[b])} keys "
                "(seq_offsets): the queries must be the last tokens of their sequence"
            )
        if (q_lengths > max_q_len).any():
            b = int(torch.nonzero(q_lengths > max_q_len)[0])
            raise ValueError(f"sequence {b} has {int(q_lengths[b])} queries (q_offsets) > max_q_len={max_q_len}")
    if num_targets is not None:
        targets = values
        bad = (targets < 0) | (targets > lengths)
        if bad.any():
            b = int(torch.nonzero(bad)[0])
            raise ValueError(
                f"num_targets[{b}]={int(targets[b])} must lie in [0, length of sequence {b}={int(lengths[b])}]"
            )


def _check_offsets(name: str, offsets: Tensor, total: int, total_name: str) -> Tensor:
    """Lengths from host ``offsets`` that must run non-decreasing from 0 to ``total``."""
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0 or last != total:
        raise ValueError(f"{name} must start at 0 and end at {total_name}={total}, got {first}..{last}")
    lengths = offsets[1:] - offsets[:-1]
    if (lengths < 0).any():
        b = int(torch.nonzero(lengths < 0)[0])
        raise ValueError(f"{name} must be non-decreasing, but {name}[{b + 1}] < {name}[{b}]")
    return lengths


def hstu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    max_seq_len: int,
    *,
    alpha: float,
    scaling_seqlen: int | None = None,
    causal: bool = True,
    max_attn_len: int = 0,
    contextual_seq_len: int = 0,
    num_targets: Tensor | None = None,
    target_group_size: int = 1,
    rab: Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    validate: bool = True,
    q_offsets: Tensor | None = None,
    max_q_len: int | None = None,
) -> Tensor:
    """HSTU attention over jagged sequences: per sequence and head, ``O = (SiLU(alpha (Q K^T + rab)) * mask) V / N``.

    Args:
        q, k: ``[total_tokens, heads, attn_dim]``; v: ``[total_tokens, heads, hidden_dim]``; float32/float64/
            bfloat16/float16, one dtype and device. Sequence ``b`` is rows ``seq_offsets[b]:seq_offsets[b + 1]``.
            With ``q_offsets`` (delta q), q is ``[total_q, heads, attn_dim]`` instead (see ``q_offsets``).
        seq_offsets: int32/int64 ``[B + 1]``, non-decreasing from 0 to total_tokens. ``B = 0`` (``[0]``) and empty
            sequences are allowed; their outputs are empty.
        max_seq_len: int >= 1 and >= every length; the padded size of ``rab`` and the default ``N``.
        alpha: finite scale of ``Q K^T + rab`` before the SiLU.
        scaling_seqlen: the ``N`` the output is divided by; default ``max_seq_len``.
        causal, max_attn_len, contextual_seq_len, num_targets, target_group_size: the mask. For a sequence of length
            ``L`` with ``T = num_targets[b]`` targets at its end (int32/int64 ``[B]``, ``0 <= T <= L``; ``T = 0``
            when None), history ``Hh = L - T`` and context ``C = min(contextual_seq_len, Hh)``, query ``i`` sees key
            ``j`` iff:

            - ``j >= Hh`` (target column): ``i`` is a target of the same group of ``target_group_size``
              consecutive targets, and ``j <= i`` (also when ``causal=False``);
            - ``j < C`` (context column): always;
            - ``i < C`` (context row), ``j < Hh``: always (whole history, no causality or window);
            - ``i >= Hh`` (target row), ``C <= j < Hh``: ``max_attn_len == 0 or Hh - j <= max_attn_len``;
            - otherwise (``C <= i, j < Hh``): ``j <= i`` if causal, and ``|i - j| <= max_attn_len`` if it is > 0.

            See ``gr_kernels.masks`` and ``hstu_valid_mask`` for the dense mask.
        rab: optional relative attention bias ``[B, 1 or heads, max_seq_len, max_seq_len]`` (row = query position,
            column = key position; broadcast over heads when its dim 1 is 1), cast to q's dtype. Receives a gradient
            of its own shape and dtype (summed over heads when shared).
        dropout_p: inverted dropout on the masked weights ``SiLU(...) * mask / N``, applied only when ``training``.
            The keep-mask comes from a seed drawn from torch's default CPU generator, so ``torch.manual_seed``
            reproduces it and the backward regenerates the same mask. Drawing it reads a Python int, a graph break
            under ``torch.compile`` (so ``fullgraph=True`` needs ``dropout_p=0`` or ``training=False``).
        backend: ``"auto"`` (highest-priority registered backend that supports the call) or a registered name.
        validate: also run the checks that read tensor values (offsets from 0 to total_tokens and non-decreasing,
            lengths <= max_seq_len, ``0 <= num_targets <= length``; with ``q_offsets`` also from 0 to total_q
            and non-decreasing, ``Q <= L`` and ``Q <= max_q_len``). They cost one device-to-host copy, a sync on
            GPU; pass False on hot paths whose inputs are known good. Skipped inside ``torch.compile`` graphs,
            which cannot read tensor values without a graph break.
        q_offsets: delta q (queries shorter than keys, for incremental inference): int32/int64 ``[B + 1]``, q is
            jagged by it (rows ``q_offsets[b]:q_offsets[b + 1]``) while k/v stay jagged by ``seq_offsets``. Sequence
            ``b``'s ``Q = q_offsets[b + 1] - q_offsets[b] <= L`` queries are its LAST ``Q`` tokens: query ``r``
            sits at position ``L - Q + r``, so its output is row ``L - Q + r`` of the full attention (every mask
            option, ``rab`` row, ``scaling_seqlen``, ``alpha`` and dropout keep-mask as there). dq comes back for
            the queries, dk/dv for every key, drab on the queries' rows only. Runs on backends that declare delta q
            (the reference, the native kernels and the Triton kernels).
        max_q_len: with ``q_offsets``, an upper bound on every ``Q`` (int in ``[1, max_seq_len]``); the reference
            pads the queries to ``[B, max_q_len]``, so a tight bound makes short deltas cheap. Default
            ``min(total_q, max_seq_len)``.

    Returns:
        ``[total_tokens, heads, hidden_dim]`` (``[total_q, ...]`` with ``q_offsets``) in q's dtype.

    Raises:
        ValueError / TypeError naming the offending argument; ValueError for an unknown backend (listing the
        registered ones) or a forced backend that cannot run the call (with its reason).
    """
    _check_structure(q, k, v, seq_offsets, max_seq_len, alpha, scaling_seqlen, max_attn_len, contextual_seq_len,
                     num_targets, target_group_size, rab, dropout_p, q_offsets, max_q_len)  # fmt: skip
    # Padded query rows per sequence under delta q (HSTUParams.max_q_len); 0 without it.
    q_rows = max_q_len if max_q_len is not None else (0 if q_offsets is None else min(q.shape[0], max_seq_len))
    if validate and not torch.compiler.is_compiling():
        check_attention_values(q, k, seq_offsets, max_seq_len, num_targets, q_offsets, q_rows)
    p = float(dropout_p) if training else 0.0
    # Drawn from the default CPU generator: reproducible under torch.manual_seed and no device sync.
    seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0.0 else 0
    params = HSTUParams(
        max_seq_len=max_seq_len,
        alpha=float(alpha),
        scaling_seqlen=max_seq_len if scaling_seqlen is None else scaling_seqlen,
        causal=bool(causal),
        max_attn_len=max_attn_len,
        contextual_seq_len=contextual_seq_len,
        target_group_size=target_group_size,
        dropout_p=p,
        dropout_seed=seed,
        max_q_len=q_rows,
    )
    call = AttentionCall(
        params=params,
        device=q.device,
        dtype=q.dtype,
        num_heads=q.shape[1],
        attention_dim=q.shape[2],
        hidden_dim=v.shape[2],
        offsets_dtype=seq_offsets.dtype,
        has_targets=num_targets is not None,
        rab_heads=0 if rab is None else rab.shape[1],
        requires_grad=torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, rab) if t is not None),
        delta_q=q_offsets is not None,
    )
    name = resolve_backend(backend, call)
    if rab is not None and rab.dtype != q.dtype:
        # The op computes in q's dtype; casting here (differentiably) lets e.g. an fp32 bias meet autocast's bf16
        # q/k/v, and its gradient comes back in rab's own dtype.
        rab = rab.to(q.dtype)
    scalars = (
        params.max_seq_len, params.alpha, params.scaling_seqlen, params.causal, params.max_attn_len,
        params.contextual_seq_len, params.target_group_size, params.dropout_p, params.dropout_seed, name,
    )  # fmt: skip
    return ops.attention_op(q, k, v, seq_offsets, num_targets, rab, scalars, q_offsets, params.max_q_len)
