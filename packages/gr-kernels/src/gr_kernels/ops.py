"""``torch.library`` custom ops of HSTU attention: forward, backward, fake impls and autograd.

Both ops take the resolved backend name, so a traced or compiled graph records which implementation runs, and the
forward's autograd formula calls the backward op of that same backend. Delta q rides on two trailing optional
arguments, ``q_offsets`` (None: q is jagged like k/v) and ``max_q_len`` (``HSTUParams.max_q_len``), which a backend
receives as ``q_offsets=`` only when given, so backends without delta q keep their signature. The backward's last
argument, ``need_drab`` (False when rab needs no gradient: a frozen bias), reaches backends that take it as
``need_drab=False``; the op returns no drab then.

``attention_op`` is what ``hstu_attention`` calls. Traced, compiled and exported code gets the custom op; eager code
gets ``EagerHSTUAttention``, an ``autograd.Function`` over the same forward and backward bodies. Why: a
``torch.library`` op pays its dispatcher and its autograd wrapper in Python on every call, about 0.2-0.3 ms of host
time per forward and per backward on an H200 host. Eight blocks a step made that host time the pace of a training
step. Profiler ranges keep the op names on the eager path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gr_kernels.backends import get_backend, skips_drab
from gr_kernels.params import HSTUParams
from gr_kernels.profiling import op_range


@torch.library.custom_op("gr_kernels::hstu_attention_fwd", mutates_args=())
def hstu_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    num_targets: Tensor | None,
    rab: Tensor | None,
    max_seq_len: int,
    alpha: float,
    scaling_seqlen: int,
    causal: bool,
    max_attn_len: int,
    contextual_seq_len: int,
    target_group_size: int,
    dropout_p: float,
    dropout_seed: int,
    backend: str,
    q_offsets: Tensor | None = None,
    max_q_len: int = 0,
) -> Tensor:
    return _forward(q, k, v, seq_offsets, num_targets, rab, max_seq_len, alpha, scaling_seqlen, causal,
                    max_attn_len, contextual_seq_len, target_group_size, dropout_p, dropout_seed, backend, q_offsets,
                    max_q_len)  # fmt: skip


def _forward(
    q: Tensor, k: Tensor, v: Tensor, seq_offsets: Tensor, num_targets: Tensor | None, rab: Tensor | None,
    max_seq_len: int, alpha: float, scaling_seqlen: int, causal: bool, max_attn_len: int, contextual_seq_len: int,
    target_group_size: int, dropout_p: float, dropout_seed: int, backend: str, q_offsets: Tensor | None,
    max_q_len: int,
) -> Tensor:  # fmt: skip
    params = HSTUParams(max_seq_len, alpha, scaling_seqlen, causal, max_attn_len, contextual_seq_len,
                        target_group_size, dropout_p, dropout_seed, max_q_len)  # fmt: skip
    return get_backend(backend).forward(q, k, v, seq_offsets, num_targets, rab, params, **_delta_q(q_offsets))


def _delta_q(q_offsets: Tensor | None) -> dict[str, Tensor]:
    return {} if q_offsets is None else {"q_offsets": q_offsets}


@hstu_attention_fwd.register_fake
def _fwd_fake(q: Tensor, k: Tensor, v: Tensor, *args: Any) -> Tensor:
    # One output row per query: total_q rows with delta q, total_tokens without.
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2])


# Explicit schema: inferred schemas cannot return an optional tensor, and drab is None without rab.
_BWD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor seq_offsets, Tensor? num_targets, Tensor? rab, "
    "SymInt max_seq_len, float alpha, SymInt scaling_seqlen, bool causal, SymInt max_attn_len, "
    "SymInt contextual_seq_len, SymInt target_group_size, float dropout_p, SymInt dropout_seed, str backend, "
    "Tensor? q_offsets=None, SymInt max_q_len=0, bool need_drab=True) -> (Tensor, Tensor, Tensor, Tensor?)"
)


@torch.library.custom_op("gr_kernels::hstu_attention_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def hstu_attention_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    num_targets: Tensor | None,
    rab: Tensor | None,
    max_seq_len: int,
    alpha: float,
    scaling_seqlen: int,
    causal: bool,
    max_attn_len: int,
    contextual_seq_len: int,
    target_group_size: int,
    dropout_p: float,
    dropout_seed: int,
    backend: str,
    q_offsets: Tensor | None = None,
    max_q_len: int = 0,
    need_drab: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(dq, dk, dv, drab)``: q's, k's, v's and rab's shapes (drab None without rab, or with ``need_drab=False``)."""
    return _backward_body(grad_out, q, k, v, seq_offsets, num_targets, rab, max_seq_len, alpha, scaling_seqlen, causal,
                          max_attn_len, contextual_seq_len, target_group_size, dropout_p, dropout_seed, backend,
                          q_offsets, max_q_len, need_drab)  # fmt: skip


def _backward_body(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, seq_offsets: Tensor, num_targets: Tensor | None,
    rab: Tensor | None, max_seq_len: int, alpha: float, scaling_seqlen: int, causal: bool, max_attn_len: int,
    contextual_seq_len: int, target_group_size: int, dropout_p: float, dropout_seed: int, backend: str,
    q_offsets: Tensor | None, max_q_len: int, need_drab: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:  # fmt: skip
    params = HSTUParams(max_seq_len, alpha, scaling_seqlen, causal, max_attn_len, contextual_seq_len,
                        target_group_size, dropout_p, dropout_seed, max_q_len)  # fmt: skip
    want_drab = rab is not None and need_drab
    kwargs = _delta_q(q_offsets)
    if rab is not None and not need_drab and skips_drab(backend):
        kwargs["need_drab"] = False
    dq, dk, dv, drab = get_backend(backend).backward(grad_out, q, k, v, seq_offsets, num_targets, rab, params, **kwargs)
    return dq, dk, dv, drab if want_drab else None


@hstu_attention_bwd.register_fake
def _bwd_fake(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, seq_offsets: Tensor, num_targets: Tensor | None,
    rab: Tensor | None, max_seq_len: int, alpha: float, scaling_seqlen: int, causal: bool, max_attn_len: int,
    contextual_seq_len: int, target_group_size: int, dropout_p: float, dropout_seed: int, backend: str,
    q_offsets: Tensor | None = None, max_q_len: int = 0, need_drab: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:  # fmt: skip
    drab = torch.empty_like(rab) if rab is not None and need_drab else None
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), drab


def _save(
    ctx: Any, tensors: tuple[Tensor | None, ...], scalars: tuple[Any, ...], q_offsets: Tensor | None, max_q_len: int
) -> None:
    """What the backward needs, saved the same way by the op's autograd and by ``EagerHSTUAttention``: ``tensors`` =
    (q, k, v, seq_offsets, num_targets, rab)."""
    ctx.save_for_backward(*tensors, q_offsets)
    ctx.scalars = tuple(scalars)
    ctx.max_q_len = max_q_len


def _input_grads(ctx: Any, grad_out: Tensor, backward: Any) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(dq, dk, dv, drab)`` from what ``_save`` kept, by ``backward`` (the backward op, or its body in eager
    calls)."""
    q, k, v, seq_offsets, num_targets, rab, q_offsets = ctx.saved_tensors
    need_drab = rab is not None and ctx.needs_input_grad[5]  # a frozen bias: no drab pass, no drab buffer
    # Native kernels want dense strides; autograd may hand over expanded or transposed gradients.
    return backward(grad_out.contiguous(), q, k, v, seq_offsets, num_targets, rab, *ctx.scalars, q_offsets,
                    ctx.max_q_len, need_drab)  # fmt: skip


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    *tensors_and_scalars, q_offsets, max_q_len = inputs
    _save(ctx, tuple(tensors_and_scalars[:6]), tuple(tensors_and_scalars[6:]), q_offsets, max_q_len)


def _backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    dq, dk, dv, drab = _input_grads(ctx, grad_out, hstu_attention_bwd)
    # Gradients for q, k, v, seq_offsets, num_targets, rab, one None per scalar argument, then q_offsets, max_q_len.
    return (dq, dk, dv, None, None, drab, *([None] * len(ctx.scalars)), None, None)


hstu_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class EagerHSTUAttention(torch.autograd.Function):
    """The forward op and its autograd formula without the ``torch.library`` dispatch (eager calls; see the module
    doc). Arguments as ``hstu_attention_fwd``'s, the scalars in one tuple."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, seq_offsets: Tensor, num_targets: Tensor | None,
        rab: Tensor | None, scalars: tuple[Any, ...], q_offsets: Tensor | None, max_q_len: int,
    ) -> Tensor:  # fmt: skip
        with op_range("gr_kernels::hstu_attention_fwd"):
            out = _forward(q, k, v, seq_offsets, num_targets, rab, *scalars, q_offsets, max_q_len)
        _save(ctx, (q, k, v, seq_offsets, num_targets, rab), scalars, q_offsets, max_q_len)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        with op_range("gr_kernels::hstu_attention_bwd"):
            dq, dk, dv, drab = _input_grads(ctx, grad_out, _backward_body)
        # Gradients for q, k, v, seq_offsets, num_targets, rab, the scalars tuple, q_offsets, max_q_len.
        return dq, dk, dv, None, None, drab, None, None, None


def attention_op(
    q: Tensor, k: Tensor, v: Tensor, seq_offsets: Tensor, num_targets: Tensor | None, rab: Tensor | None,
    scalars: tuple[Any, ...], q_offsets: Tensor | None, max_q_len: int,
) -> Tensor:  # fmt: skip
    """The HSTU attention forward with autograd: ``gr_kernels::hstu_attention_fwd`` while Dynamo compiles or
    ``torch.export`` traces, ``EagerHSTUAttention`` otherwise. ``scalars``: ``hstu_attention_fwd``'s arguments from
    ``max_seq_len`` to ``backend``."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return torch.ops.gr_kernels.hstu_attention_fwd(q, k, v, seq_offsets, num_targets, rab, *scalars, q_offsets,
                                                       max_q_len)  # fmt: skip
    return EagerHSTUAttention.apply(q, k, v, seq_offsets, num_targets, rab, scalars, q_offsets, max_q_len)
