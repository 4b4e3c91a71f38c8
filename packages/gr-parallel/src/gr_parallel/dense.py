"""The dense part of hybrid-parallel training: gradient sync over the DP group, global loss normalisation, clipping
across TP and DP, the dense optimizer and bf16 mixed precision.

Loss convention: each rank computes the SUM of its per-token losses and divides by ``global_count`` (the token count
of the whole global batch, all-reduced over the DP group). The gradients each DP rank holds then add up to the
gradient of the global mean, so ``DenseGradSync`` all-reduces with SUM (no division by the DP size), and sharded
tables see the same sum (``gr_parallel.sparse``).

Two gradient syncs with one interface (``sync()``, ``zero_grad()``, ``broadcast_parameters()``): ``DenseGradSync``
(ours: flat SUM all-reduces; gloo and NCCL, the CPU path and the default) and ``MegatronGradSync`` (Megatron-Core's
``DistributedDataParallel`` over the same parameters: contiguous fp32 grad buffers filled by grad-accumulation hooks
during backward; CUDA only, since Megatron allocates its buffers on the current CUDA device; opt-in with
``ParallelizeConfig.megatron_ddp``). The dense optimizer is torch ``AdamW`` on every path: Megatron-Core's
distributed optimizer re-points ``param.data`` into its own sharded buffers and keeps its state in its own checkpoint
format, which the TorchRec/DCP checkpoints of this package do not read.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from gr_parallel.context import ParallelContext

DEFAULT_BUCKET_MB = 25.0


def is_tensor_parallel(p: torch.Tensor) -> bool:
    """Whether ``p`` is one TP rank's shard (Megatron marks those ``tensor_model_parallel=True``)."""
    return bool(getattr(p, "tensor_model_parallel", False))


# ------------------------------------------------------------------------------------------ counts
def global_count(local: int | float | torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """``local`` summed over the DP group (e.g. the global batch's token count), as a tensor on ``ctx.device``.
    The ranks of a TP group read the same batch, so they contribute once: only the DP group is summed."""
    if isinstance(local, torch.Tensor):
        if local.numel() != 1:
            raise ValueError(f"global_count takes a scalar count, got a tensor of shape {tuple(local.shape)}")
        t = local.detach().reshape(()).to(ctx.device, copy=True)
    elif isinstance(local, bool) or not isinstance(local, int | float):
        raise TypeError(f"global_count takes an int, float or scalar tensor, got {type(local).__name__}")
    else:
        dtype = torch.int64 if isinstance(local, int) else torch.float64
        t = torch.tensor(local, dtype=dtype, device=ctx.device)
    if ctx.dp_size > 1:
        dist.all_reduce(t, group=ctx.dp_group)
    return t


# ------------------------------------------------------------------------------------------ gradient sync
class DenseGradSync:
    """SUM all-reduce of dense gradients over ``ctx.dp_group``, in buckets of about ``bucket_mb`` MiB (one flat
    tensor per bucket: few large collectives instead of one per parameter). Works on gloo and NCCL.

    Call ``sync()`` after backward, before clipping and the optimizer step. A parameter that got no gradient on a
    rank takes part with zeros (every rank must run the same collectives); it gets the summed gradient back, which
    is zeros if no rank had one. Sparse gradients (e.g. a data-parallel ``nn.Embedding(sparse=True)``) are
    densified. ``broadcast_parameters()`` copies the first DP rank's values to the others (same start everywhere).
    """

    def __init__(
        self, params: Iterable[nn.Parameter], ctx: ParallelContext, *, bucket_mb: float = DEFAULT_BUCKET_MB
    ) -> None:
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be positive, got {bucket_mb}")
        self.ctx = ctx
        self.params = [p for p in params if p.requires_grad]
        seen: set[int] = set()
        for p in self.params:
            if id(p) in seen:
                raise ValueError("a parameter is listed twice in the dense gradient sync")
            seen.add(id(p))
        self.buckets = grad_buckets(self.params, int(bucket_mb * 2**20))

    def sync(self) -> None:
        if self.ctx.dp_size == 1:
            # Nothing to sum: gradients only leave in the same form as with more ranks (dense, none missing). No flat
            # copy and copy-back (66 copies a step for 8 HSTU blocks on a GPU, for nothing).
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                elif p.grad.is_sparse:
                    p.grad = p.grad.to_dense()
            return
        for bucket in self.buckets:
            grads = []
            for p in bucket:
                g = p.grad
                if g is None:
                    g = torch.zeros_like(p)
                elif g.is_sparse:
                    g = g.to_dense()
                grads.append(g.reshape(-1))
            flat = torch.cat(grads) if len(grads) > 1 else grads[0].clone()
            dist.all_reduce(flat, group=self.ctx.dp_group)
            chunks = flat.split([p.numel() for p in bucket])
            into, sums = [], []
            for p, chunk in zip(bucket, chunks, strict=True):
                if p.grad is None or p.grad.is_sparse:
                    p.grad = chunk.view_as(p).clone()
                else:
                    into.append(p.grad)
                    sums.append(chunk.view_as(p))
            if into:
                torch._foreach_copy_(into, sums)  # one multi-tensor launch, not one copy per parameter

    __call__ = sync

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def broadcast_parameters(self) -> None:
        """Makes every DP rank start from the first DP rank's values (TP shards differ by TP rank and stay)."""
        if self.ctx.dp_size == 1:
            return
        src = self.ctx.dp_ranks[0] if getattr(self.ctx, "dp_ranks", None) else self.ctx.rank % self.ctx.tp_size
        for bucket in self.buckets:
            flat = torch.cat([p.detach().reshape(-1) for p in bucket])
            dist.broadcast(flat, src=src, group=self.ctx.dp_group)
            offset = 0
            for p in bucket:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()


class MegatronGradSync:
    """Megatron-Core ``DistributedDataParallel`` as the dense gradient sync (CUDA/NCCL only).

    Megatron's DDP wraps a module; here it wraps a holder of exactly the dense parameters (wherever they live in the
    model: the hooks sit on each parameter's gradient accumulator, not on a forward). During backward each gradient
    is added into a contiguous fp32 ``param.main_grad`` buffer; ``sync()`` all-reduces the buffers over the DP group
    (``calculate_per_token_loss``: a SUM, our loss is normalised by the global count) and points ``param.grad`` at
    them for clipping and the torch optimizer. ``zero_grad()`` clears the buffers (call it instead of the optimizer's
    zero_grad)."""

    def __init__(
        self, params: Iterable[nn.Parameter], ctx: ParallelContext, *, bucket_mb: float = DEFAULT_BUCKET_MB
    ) -> None:
        if ctx.device.type != "cuda":
            raise RuntimeError(
                "Megatron-Core DDP needs CUDA (its gradient buffers live on the current CUDA device); on the CPU use "
                "DenseGradSync (ParallelizeConfig.megatron_ddp=False)"
            )
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.transformer import TransformerConfig

        self.ctx = ctx
        self.params = [p for p in params if p.requires_grad]
        holder = nn.Module()
        holder.params = nn.ParameterList(self.params)
        # Only the parallel sizes and the loss convention of this config matter to DDP.
        config = TransformerConfig(
            num_layers=1,
            hidden_size=ctx.tp_size,
            num_attention_heads=ctx.tp_size,
            tensor_model_parallel_size=ctx.tp_size,
            calculate_per_token_loss=True,
        )
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=False,
            average_in_collective=False,
            bucket_size=int(bucket_mb * 2**20 / 4),
        )
        self.ddp = DistributedDataParallel(config, ddp_config, holder)

    def sync(self) -> None:
        self.ddp.finish_grad_sync()
        for p in self.params:
            p.grad = p.main_grad if p.main_grad.dtype == p.dtype else p.main_grad.to(p.dtype)

    __call__ = sync

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def broadcast_parameters(self) -> None:
        DenseGradSync(self.params, self.ctx).broadcast_parameters()


def grad_buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    """Consecutive parameters of one dtype and device, up to ``bucket_bytes`` per bucket (a larger parameter gets a
    bucket of its own)."""
    out: list[list[nn.Parameter]] = []
    current: list[nn.Parameter] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if current and (p.dtype != current[0].dtype or p.device != current[0].device or size + nbytes > bucket_bytes):
            out.append(current)
            current, size = [], 0
        current.append(p)
        size += nbytes
    if current:
        out.append(current)
    return out


def sync_dense_grads(model_or_params: nn.Module | Iterable[nn.Parameter], ctx: ParallelContext) -> None:
    """One-shot ``DenseGradSync`` over a module's dense parameters (those not trained by a fused table optimizer)
    or over the given parameters. For a training loop build a ``DenseGradSync`` once (or use ``parallelize``)."""
    DenseGradSync(dense_parameters(model_or_params), ctx).sync()


def dense_parameters(model_or_params: nn.Module | Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """Trainable parameters that belong to the dense optimizer: every one except those a fused embedding optimizer
    updates inside backward (TorchRec marks them ``_in_backward_optimizers``)."""
    params = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    out, seen = [], set()
    for p in params:
        if not p.requires_grad or id(p) in seen or getattr(p, "_in_backward_optimizers", None):
            continue
        if type(p).__name__ in ("ShardedTensor", "DTensor"):  # sharded table weights: never dense
            continue
        seen.add(id(p))
        out.append(p)
    return out


# ------------------------------------------------------------------------------------------ clipping
def grad_norm(params: Iterable[torch.Tensor], ctx: ParallelContext, norm_type: float = 2.0) -> torch.Tensor:
    """The norm of the full model's gradient: TP-sharded parameters' parts are combined over the TP group,
    replicated parameters (identical on every TP rank) counted once. Call after the DP sync (DP ranks then hold the
    same gradients, so no DP reduction is needed)."""
    norm_type = float(norm_type)
    if not (norm_type == math.inf or norm_type > 0):
        raise ValueError(f"norm_type must be positive or inf, got {norm_type}")
    grads = [(p.grad, is_tensor_parallel(p)) for p in params if p.grad is not None]
    device = grads[0][0].device if grads else ctx.device
    # One foreach norm per group (torch's clip_grad_norm_ does the same): a kernel per parameter would cost ~70 launches
    # per step for an 8-block HSTU model.
    parts = []
    for tp in (True, False):
        # fp32 norms (.float() is the tensor itself for fp32 gradients, the usual case)
        group = [(g.detach().to_dense() if g.is_sparse else g.detach()).float() for g, is_tp in grads if is_tp == tp]
        group = [g for g in group if g.numel()]
        if not group:
            parts.append(torch.zeros((), dtype=torch.float32, device=device))
            continue
        norms = torch.stack([n.to(device) for n in torch._foreach_norm(group, norm_type)])
        parts.append(norms.max() if norm_type == math.inf else (norms**norm_type).sum())
    sharded, replicated = parts
    if ctx.tp_size > 1:
        op = dist.ReduceOp.MAX if norm_type == math.inf else dist.ReduceOp.SUM
        dist.all_reduce(sharded, op=op, group=ctx.tp_group)
    if norm_type == math.inf:
        return torch.maximum(sharded, replicated)
    return (sharded + replicated) ** (1.0 / norm_type)


def clip_grad_norm_(
    params: Iterable[torch.Tensor], max_norm: float, ctx: ParallelContext, norm_type: float = 2.0
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` of the full (TP-gathered) model: returns the total norm and scales every
    gradient by ``min(1, max_norm / (norm + 1e-6))`` (torch's rule), so TP and DP runs clip exactly like one
    process. Call after ``DenseGradSync.sync``."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    params = list(params)
    total = grad_norm(params, ctx, norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    grads = [p.grad.detach() for p in params if p.grad is not None]
    dense = [g for g in grads if not g.is_sparse]
    if dense:
        torch._foreach_mul_(dense, coef)  # grouped by device and dtype inside; coef is cast per group
    for g in grads:
        if g.is_sparse:
            g.mul_(coef.to(g.device, g.dtype))
    return total


# ------------------------------------------------------------------------------------------ optimizer
@dataclass
class DenseOptimizerConfig:
    """AdamW settings of the dense parameters."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"dense optimizer lr must be positive, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"dense optimizer betas must be in [0, 1), got {self.betas}")
        if not self.eps > 0 or self.weight_decay < 0:
            raise ValueError(f"need eps > 0 and weight_decay >= 0, got {self.eps}, {self.weight_decay}")


def dense_optimizer(params: Iterable[nn.Parameter], config: DenseOptimizerConfig) -> torch.optim.Optimizer:
    """torch ``AdamW`` over the dense parameters (each rank steps its own TP shards; DP ranks hold equal gradients
    after the sync, so they stay equal). This is the CPU path and the default everywhere; Megatron-Core's
    distributed optimizer (optimizer state sharded over DP) is CUDA-only and not used here. Parameters all on CUDA
    step with the fused kernel (one launch for every tensor), otherwise with the multi-tensor (foreach) one; both
    compute the same update."""
    params = list(params)
    on_cuda = bool(params) and all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(
        params,
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        fused=True if on_cuda else None,
        foreach=None if on_cuda else True,
    )


# ------------------------------------------------------------------------------------------ mixed precision
def autocast(ctx: ParallelContext, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``ctx.device`` (CUDA or CPU) when ``enabled``: matmuls run in bf16 while parameters, their
    gradients and the optimizer stay fp32 (the fp32 master weights are the parameters themselves)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16)


def named_dense_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    keep = {id(p) for p in dense_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) in keep:
            yield name, p
