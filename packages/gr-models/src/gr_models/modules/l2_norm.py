"""``l2_normalize(x, eps)``: ``F.normalize(x, p=2, dim=-1, eps=eps)`` in one pass forward and one backward, the
retrieval model's normalisation of its queries and item embeddings; a ``torch.library`` custom op with autograd and
fake impls, which compiled and exported code records; eager calls run the same bodies through ``EagerL2Normalize``
and skip the op's Python dispatch.

Why: on an H200 training step ``F.normalize`` of the fp32 ``[65k, 512]`` queries and looked-up item rows costs ~2 ms
of GPU kernels, ~10 small passes (forward: ``linalg_vector_norm``, ``clamp_min``, ``expand``, ``div``; backward: the
``div``, norm and expand gradients and their sum). Here one kernel reads ``x`` and writes ``y`` and each row's fp32
norm; the backward reads ``dy``, ``y`` and the norms once and writes ``dx``.

``out_dtype`` writes ``y`` in another dtype than ``x`` (e.g. bf16 rows of an fp32 ``x`` for an autocast matmul that
would cast them anyway: the retrieval loss's, where the separate casts and their backward copies cost ~0.3 ms of a
65k-token H200 step); the gradient still reaches ``x`` in ``x``'s dtype.

Gradient: with ``r = max(||x||, eps)``, ``dx = (dy - [||x|| >= eps] * y * sum(dy * y)) / r``, F.normalize's own (its
``clamp_min`` passes the gradient where ``||x|| >= eps``; below, the denominator is the constant ``eps``, so a zero row
gets ``y = 0`` and ``dx = dy / eps``). The forward saves the output ``y`` (which its consumer keeps anyway), not ``x``.

CUDA tensors run ``l2_norm_kernels`` compiled (when Triton is installed); every other case (CPU, no Triton, other
dtypes, rows over ``MAX_D``) runs ``F.normalize`` itself, so CPU training is unchanged. Tests set
``INTERPRET_ON_CPU`` to run the kernels' interpreted copy on CPU tensors.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

import gr_kernels
from gr_kernels.profiling import op_range
from gr_kernels.triton_interpreter import KernelModules
from gr_models.modules.triton_rows import device_scope, kernel_device, unit_stride_rows, whole_row_tiles

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_D = 8192  # one program holds whole rows
_INTERPRETED_NAME = "gr_models.modules._interpreted_l2_norm_kernels"
INTERPRET_ON_CPU = False  # CPU tensors through Triton's interpreter (tests; far slower than F.normalize)

_KERNELS = KernelModules("gr_models.modules.l2_norm_kernels", _INTERPRETED_NAME)


def runs_fused(t: Tensor) -> bool:
    """Whether ``l2_normalize`` on tensors like ``t`` runs the fused kernels: CUDA (CPU only when the tests set
    ``INTERPRET_ON_CPU``), Triton installed, a dtype of ``SUPPORTED_DTYPES`` and ``1 <= D <= MAX_D``. Elsewhere it
    runs ``F.normalize``."""
    return (
        kernel_device(t, INTERPRET_ON_CPU)
        and gr_kernels.triton_available()
        and t.dtype in SUPPORTED_DTYPES
        and t.dim() >= 1
        and 0 < t.shape[-1] <= MAX_D
    )


def _kernels(t: Tensor) -> ModuleType | None:
    """The kernels module for ``t``'s device; None: the op's PyTorch bodies run (the op called directly elsewhere)."""
    return _KERNELS.for_device(t.device) if runs_fused(t) else None


@torch.library.custom_op("gr_models::l2_normalize", mutates_args=())
def _l2_normalize_op(x: Tensor, eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(y, norm)``: the rows of ``x`` (``[n, D]``) normalised, in ``out_dtype``, and their fp32 norms (unclamped:
    the backward needs ``||x|| >= eps`` as well as ``max(||x||, eps)``)."""
    return _forward_body(x, eps, out_dtype)


def _forward_body(x: Tensor, eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    n, d = x.shape
    kernels = _kernels(x) if out_dtype in SUPPORTED_DTYPES else None
    if kernels is None:  # F.normalize's formula, with the norms the backward needs
        xa = x.to(torch.promote_types(x.dtype, torch.float32))
        norm = torch.linalg.vector_norm(xa, dim=-1)
        return (xa / norm.clamp_min(eps)[:, None]).to(out_dtype).contiguous(), norm.float()
    x = unit_stride_rows(x)
    y = torch.empty((n, d), dtype=out_dtype, device=x.device)
    norm = torch.empty(n, dtype=torch.float32, device=x.device)
    if n:
        block_rows, block_d = whole_row_tiles(d, x.device)
        with device_scope(x):
            kernels.l2_normalize_fwd_kernel[(-(-n // block_rows),)](
                x, y, norm, n, x.stride(0), y.stride(0), eps, D=d, BLOCK_ROWS=block_rows, BLOCK_D=block_d
            )
    return y, norm


@_l2_normalize_op.register_fake
def _(x: Tensor, eps: float, out_dtype: torch.dtype):
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[:1], dtype=torch.float32)


@torch.library.custom_op("gr_models::l2_normalize_bwd", mutates_args=())
def _l2_normalize_bwd_op(dy: Tensor, y: Tensor, norm: Tensor, eps: float, dx_dtype: torch.dtype) -> Tensor:
    """``dx`` (in ``dx_dtype``, the forward input's) from the forward's output ``y`` and norms."""
    return _backward_body(dy, y, norm, eps, dx_dtype)


def _backward_body(dy: Tensor, y: Tensor, norm: Tensor, eps: float, dx_dtype: torch.dtype) -> Tensor:
    n, d = y.shape
    kernels = _kernels(y) if dx_dtype in SUPPORTED_DTYPES else None
    if kernels is None:
        acc = torch.promote_types(y.dtype, torch.float32)
        dyf, yf = dy.to(acc), y.to(acc)
        dot = torch.where(norm >= eps, (dyf * yf).sum(-1), 0.0)
        return ((dyf - yf * dot[:, None]) / norm.clamp_min(eps)[:, None]).to(dx_dtype).contiguous()
    dy, y = unit_stride_rows(dy), unit_stride_rows(y)
    dx = torch.empty((n, d), dtype=dx_dtype, device=y.device)
    if n:
        block_rows, block_d = whole_row_tiles(d, y.device)
        with device_scope(y):
            kernels.l2_normalize_bwd_kernel[(-(-n // block_rows),)](
                dy, y, norm, dx, n, dy.stride(0), y.stride(0), dx.stride(0), eps,
                D=d, BLOCK_ROWS=block_rows, BLOCK_D=block_d,
            )  # fmt: skip
    return dx


@_l2_normalize_bwd_op.register_fake
def _(dy: Tensor, y: Tensor, norm: Tensor, eps: float, dx_dtype: torch.dtype):
    return y.new_empty(y.shape, dtype=dx_dtype)


def _save(ctx, y: Tensor, norm: Tensor, eps: float, x_dtype: torch.dtype) -> None:
    ctx.save_for_backward(y, norm)
    ctx.eps = eps
    ctx.x_dtype = x_dtype


def _input_grads(ctx, dy: Tensor, backward) -> tuple[Tensor, None, None]:
    """The gradients of ``(x, eps, out_dtype)`` from the saved tensors, by ``backward`` (the backward op, or its body
    in eager calls)."""
    y, norm = ctx.saved_tensors
    return backward(dy, y, norm, ctx.eps, ctx.x_dtype), None, None


def _setup_context(ctx, inputs, output) -> None:
    x, eps, _out_dtype = inputs
    y, norm = output
    _save(ctx, y, norm, eps, x.dtype)


def _backward(ctx, dy, _dnorm):
    return _input_grads(ctx, dy, _l2_normalize_bwd_op)


_l2_normalize_op.register_autograd(_backward, setup_context=_setup_context)


class EagerL2Normalize(torch.autograd.Function):
    """The op and its autograd formula without the ``torch.library`` dispatch, for eager calls (as
    ``norm_mul.EagerLayerNormMul``). Profiler ranges keep the op names."""

    @staticmethod
    def forward(ctx, x: Tensor, eps: float, out_dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        with op_range("gr_models::l2_normalize"):
            y, norm = _forward_body(x, eps, out_dtype)
        _save(ctx, y, norm, eps, x.dtype)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        with op_range("gr_models::l2_normalize_bwd"):
            return _input_grads(ctx, dy, _backward_body)


def l2_normalize(x: Tensor, eps: float = 1e-12, *, out_dtype: torch.dtype | None = None) -> Tensor:
    """``F.normalize(x, p=2, dim=-1, eps=eps)`` for ``x`` of any shape ``[..., D]``: values (in ``out_dtype``,
    default ``x``'s, the norm computed in fp32) and gradients (in ``x``'s dtype). Fused where ``runs_fused(x)`` (and
    ``out_dtype`` is one of ``SUPPORTED_DTYPES``), else ``F.normalize`` itself followed by a cast to ``out_dtype``.
    The result is saved for the backward: modifying it in place breaks the backward (autograd raises)."""
    if x.dim() < 1:
        raise ValueError("l2_normalize needs a tensor of at least one dimension, got a scalar")
    if out_dtype is not None and not out_dtype.is_floating_point:
        raise ValueError(f"l2_normalize out_dtype must be a floating-point dtype, got {out_dtype}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if not runs_fused(x) or out_dtype not in SUPPORTED_DTYPES:
        return F.normalize(x, p=2.0, dim=-1, eps=eps).to(out_dtype)
    rows = x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        y = _l2_normalize_op(rows, float(eps), out_dtype)[0]
    else:
        y = EagerL2Normalize.apply(rows, float(eps), out_dtype)
    return y.view(x.shape)
