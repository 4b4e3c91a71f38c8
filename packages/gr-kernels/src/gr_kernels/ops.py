"""``torch.library`` custom ops of HSTU attention: forward, backward, fake impls, autograd.

The ops take the resolved backend name, so a traced/compiled graph records which implementation runs; the
autograd formula of the forward op calls the backward op of the same backend.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gr_kernels.backends import get_backend
from gr_kernels.reference import MaskSpec


@torch.library.custom_op("gr_kernels::hstu_attention_fwd", mutates_args=())
def hstu_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    max_seq_len: int,
    alpha: float,
    scaling_seqlen: int,
    causal: bool,
    max_attn_len: int,
    contextual_seq_len: int,
    num_targets: Tensor | None,
    target_group_size: int,
    rab: Tensor | None,
    dropout_p: float,
    dropout_seed: int,
    backend: str,
) -> Tensor:
    mask = MaskSpec(causal, max_attn_len, contextual_seq_len, target_group_size)
    return get_backend(backend).forward(
        q, k, v, seq_offsets, max_seq_len, alpha, scaling_seqlen, mask, num_targets, rab, dropout_p, dropout_seed
    )


@hstu_attention_fwd.register_fake
def _fwd_fake(q: Tensor, k: Tensor, v: Tensor, *args: Any) -> Tensor:
    return v.new_empty(v.shape)


@torch.library.custom_op("gr_kernels::hstu_attention_bwd", mutates_args=())
def hstu_attention_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    max_seq_len: int,
    alpha: float,
    scaling_seqlen: int,
    causal: bool,
    max_attn_len: int,
    contextual_seq_len: int,
    num_targets: Tensor | None,
    target_group_size: int,
    rab: Tensor | None,
    dropout_p: float,
    dropout_seed: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, drab); drab is an empty ``[0]`` tensor when there is no rab (ops return tensors)."""
    mask = MaskSpec(causal, max_attn_len, contextual_seq_len, target_group_size)
    dq, dk, dv, drab = get_backend(backend).backward(
        grad_out,
        q,
        k,
        v,
        seq_offsets,
        max_seq_len,
        alpha,
        scaling_seqlen,
        mask,
        num_targets,
        rab,
        dropout_p,
        dropout_seed,
    )
    if drab is None:
        drab = q.new_empty(0)
    return dq, dk, dv, drab


@hstu_attention_bwd.register_fake
def _bwd_fake(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, *args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    rab = args[9]
    drab = q.new_empty(0) if rab is None else rab.new_empty(rab.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), drab


_TENSOR_ARGS = ("q", "k", "v", "seq_offsets", "num_targets", "rab")
_SCALAR_ARGS = (
    "max_seq_len", "alpha", "scaling_seqlen", "causal", "max_attn_len", "contextual_seq_len", "target_group_size",
    "dropout_p", "dropout_seed", "backend",
)  # fmt: skip


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    (q, k, v, seq_offsets, max_seq_len, alpha, scaling_seqlen, causal, max_attn_len, contextual_seq_len,
     num_targets, target_group_size, rab, dropout_p, dropout_seed, backend) = inputs  # fmt: skip
    ctx.save_for_backward(q, k, v, seq_offsets, num_targets, rab)
    ctx.scalars = (max_seq_len, alpha, scaling_seqlen, causal, max_attn_len, contextual_seq_len, target_group_size,
                   dropout_p, dropout_seed, backend)  # fmt: skip


def _backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    q, k, v, seq_offsets, num_targets, rab = ctx.saved_tensors
    (max_seq_len, alpha, scaling_seqlen, causal, max_attn_len, contextual_seq_len, target_group_size, dropout_p,
     dropout_seed, backend) = ctx.scalars  # fmt: skip
    dq, dk, dv, drab = hstu_attention_bwd(
        grad_out.contiguous(), q, k, v, seq_offsets, max_seq_len, alpha, scaling_seqlen, causal, max_attn_len,
        contextual_seq_len, num_targets, target_group_size, rab, dropout_p, dropout_seed, backend,
    )  # fmt: skip
    return (dq, dk, dv, None, None, None, None, None, None, None, None, None,
            drab if rab is not None else None, None, None, None)  # fmt: skip


hstu_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
