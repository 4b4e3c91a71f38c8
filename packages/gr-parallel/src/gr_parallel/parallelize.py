"""``parallelize``: one call from a single-device gr-models model to its hybrid-parallel form.

Order: tensor-parallel HSTU blocks (when ``ctx.tp_size > 1``), then every embedding table sharded by TorchRec over the
whole world (``gr_parallel.sparse``), then (``compile_dense``) the HSTU blocks compiled, then the dense
parameters' DP gradient sync, clipping and optimizer (``gr_parallel.dense``). A training step::

    pm = parallelize(model, ctx, ParallelizeConfig(embedding_optimizer=..., grad_clip=1.0))
    count = global_count(local_tokens, ctx)
    with pm.autocast():
        loss = loss_sum(pm.module, batch) / count
    loss.backward()        # tables update inside backward (fused optimizers)
    pm.step()              # DP gradient sync, clipping, dense optimizer step, zero_grad
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import ParameterConstraints
from torchrec.distributed.types import ShardingPlan

from gr_parallel.dense import (
    DEFAULT_BUCKET_MB,
    DenseGradSync,
    DenseOptimizerConfig,
    MegatronGradSync,
    autocast,
    clip_grad_norm_,
    dense_optimizer,
    dense_parameters,
)
from gr_parallel.sparse import fused_params_for, shard_sparse

# compile_hstu_blocks' scopes (gr_models.modules.compile.SCOPES; not imported here, so that building a config does not
# import gr-models' modules).
COMPILE_SCOPES = ("block", "projections")

if TYPE_CHECKING:
    from gr_parallel.context import ParallelContext


@dataclass
class EmbeddingOptimizerConfig:
    """The fused optimizer of the static tables (and of dynamic tables that have none of their own)."""

    kind: str = "adagrad"  # "sgd", "adagrad", "rowwise_adagrad", "adam" (adam: CUDA only for static tables)
    lr: float = 1e-2
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.999

    def fused_params(self) -> dict[str, Any]:
        return fused_params_for(self.kind, self.lr, eps=self.eps, beta1=self.beta1, beta2=self.beta2)


@dataclass
class ParallelizeConfig:
    """What ``parallelize`` does (Megatron-style: one dataclass, every field has a working default)."""

    # Per-table TorchRec ParameterConstraints (or gr-dynemb DynamicParameterConstraints), keyed by table name.
    constraints: dict[str, ParameterConstraints] = field(default_factory=dict)
    embedding_optimizer: EmbeddingOptimizerConfig = field(default_factory=EmbeddingOptimizerConfig)
    dense_optimizer: DenseOptimizerConfig = field(default_factory=DenseOptimizerConfig)
    bf16: bool = False  # autocast to bf16 in pm.autocast(); fp32 parameters, gradients and optimizer
    grad_clip: float | None = None  # max global L2 norm of the dense gradients (None: no clipping)
    bucket_mb: float = DEFAULT_BUCKET_MB  # DP all-reduce bucket size
    megatron_ddp: bool = False  # CUDA: Megatron-Core DDP as the dense gradient sync (else ours, any backend)
    broadcast_dense: bool = True  # start every DP rank from the first DP rank's dense parameters
    planner_batch_size: int | None = None  # the per-rank batch the sharding planner costs
    # "bf16" / "fp16": the sharded tables' looked-up rows (forward) and their gradients (backward) cross the
    # all-to-alls in that precision (TorchRec QCommsConfig; gloo has no bf16 codec, TorchRec falls back to fp16);
    # None: fp32. The tables and their optimizer stay fp32.
    qcomms: str | None = None
    # torch.compile (Inductor) every HSTU block, gr_models.modules.compile_hstu_blocks with this scope: "block" (each
    # block's whole forward, attention op included, one graph for all blocks and jagged batches; the offsets check
    # still runs eagerly once per step), "projections" (only the dense parts around the eager attention op). True
    # means "block"; False (default) compiles nothing. tp=1 only: TP blocks run Megatron collectives inside, and a
    # CPU probe (tp=2, gloo, aot_eager) found a compiled TP block's forward split at every async all-reduce
    # (async_op=True is a graph break): 30 Dynamo frames for one block forward (outputs equal to eager).
    # On 1 x H200 "projections" made the bench_parallel step slower (154 vs 84 ms); a whole-block patch measured
    # 72.0 ms (see gr_models/modules/compile.py).
    compile_dense: bool | str = False

    def __post_init__(self) -> None:
        if self.qcomms not in (None, "bf16", "fp16"):
            raise ValueError(f"qcomms must be None, 'bf16' or 'fp16', got {self.qcomms!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip}")
        if not self.bucket_mb > 0:
            raise ValueError(f"bucket_mb must be positive, got {self.bucket_mb}")
        if self.compile_dense not in (False, True, *COMPILE_SCOPES):
            raise ValueError(
                f"compile_dense must be False, True (= 'block') or one of {COMPILE_SCOPES}, got {self.compile_dense!r}"
            )

    @property
    def compile_scope(self) -> str | None:
        """The ``compile_hstu_blocks`` scope ``compile_dense`` asks for (None: blocks stay eager)."""
        if self.compile_dense is False:
            return None
        return "block" if self.compile_dense is True else self.compile_dense


class ParallelModel(nn.Module):
    """A model after ``parallelize``: ``module`` is the model itself (its collections sharded, its HSTU blocks
    tensor-parallel), ``dmp`` the TorchRec wrapper (state dicts, fused optimizers, plan), ``optimizer`` the dense
    optimizer. Call the model's own methods through ``module`` (e.g. ``pm.module.item_embeddings(ids)``)."""

    def __init__(
        self,
        dmp: DistributedModelParallel,
        ctx: ParallelContext,
        config: ParallelizeConfig,
        plan: ShardingPlan,
    ) -> None:
        super().__init__()
        self.dmp = dmp
        self.ctx = ctx
        self.config = config
        self.plan = plan
        self.dense_params = dense_parameters(dmp.module)
        sync_type = MegatronGradSync if config.megatron_ddp else DenseGradSync
        self.grad_sync: DenseGradSync | MegatronGradSync = sync_type(self.dense_params, ctx, bucket_mb=config.bucket_mb)
        if config.broadcast_dense:
            self.grad_sync.broadcast_parameters()
        self.optimizer = dense_optimizer(self.dense_params, config.dense_optimizer)

    @property
    def module(self) -> nn.Module:
        return self.dmp.module

    @property
    def fused_optimizer(self) -> Any:
        """TorchRec's keyed optimizer of the sharded tables (their state, for checkpoints)."""
        return self.dmp.fused_optimizer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.autocast():
            return self.dmp(*args, **kwargs)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when ``config.bf16`` (wrap the loss computation in it too)."""
        return autocast(self.ctx, self.config.bf16)

    def sync_grads(self) -> None:
        """SUM all-reduce of the dense gradients over the DP group."""
        self.grad_sync.sync()

    def clip_grad_norm_(self, max_norm: float | None = None) -> torch.Tensor:
        """Clips the dense gradients to ``max_norm`` (default ``config.grad_clip``) by the full model's norm across
        TP and DP; returns the norm. Call after ``sync_grads``."""
        max_norm = self.config.grad_clip if max_norm is None else max_norm
        if max_norm is None:
            raise ValueError("no max_norm given and ParallelizeConfig.grad_clip is None")
        return clip_grad_norm_(self.dense_params, max_norm, self.ctx)

    def step(self) -> torch.Tensor | None:
        """After backward: DP sync, clipping (when ``config.grad_clip``), dense optimizer step, zero_grad. Returns
        the gradient norm when clipping."""
        self.sync_grads()
        norm = self.clip_grad_norm_() if self.config.grad_clip is not None else None
        self.optimizer.step()
        self.zero_grad()
        return norm

    def zero_grad(self, set_to_none: bool = True) -> None:  # type: ignore[override]
        """Clears the dense gradients (and Megatron's grad buffers when it syncs them)."""
        self.grad_sync.zero_grad()

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """The DMP's state dict (sharded tables as TorchRec's sharded tensors, dynamic shards, local dense params)."""
        return self.dmp.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        return self.dmp.load_state_dict(state_dict, strict=strict, assign=assign)


def hstu_encoders(model: nn.Module) -> list[nn.Module]:
    from gr_models.modules.hstu import HSTUEncoder

    return [m for m in model.modules() if isinstance(m, HSTUEncoder)]


def apply_tensor_parallel(model: nn.Module, ctx: ParallelContext) -> None:
    """Converts every HSTU encoder of ``model`` in place to tensor-parallel blocks (``ctx.tp_size > 1``)."""
    encoders = hstu_encoders(model)
    if not encoders:
        raise ValueError(
            f"tensor parallelism (tp={ctx.tp_size}) needs an HSTUEncoder in the model; found none "
            f"({type(model).__name__})"
        )
    for enc in encoders:
        heads = enc.config.num_heads
        if heads % ctx.tp_size:
            raise ValueError(f"tp={ctx.tp_size} does not divide the HSTU encoder's num_heads={heads}")
    from gr_parallel.tensor_parallel import tensor_parallel_hstu

    for enc in encoders:
        tensor_parallel_hstu(enc, ctx)


def parallelize(model: nn.Module, ctx: ParallelContext, config: ParallelizeConfig | None = None) -> ParallelModel:
    """The hybrid-parallel form of ``model`` (modified in place; every rank must pass an identically initialised
    model): TP conversion when ``ctx.tp_size > 1``, every embedding table sharded over the world, dense gradient
    sync over the DP group. Embedding tables train inside backward with ``config.embedding_optimizer`` (dynamic
    tables with their own optimizer when they have one); the dense parameters with ``pm.optimizer`` in
    ``pm.step()``."""
    config = config or ParallelizeConfig()
    if not isinstance(config, ParallelizeConfig):
        raise TypeError(f"config must be a ParallelizeConfig, got {type(config).__name__}")
    if config.compile_scope is not None and ctx.tp_size > 1:
        raise ValueError(
            f"compile_dense supports tp=1 only (got tp={ctx.tp_size}): tensor-parallel HSTU blocks run Megatron's "
            "collectives inside their projections, and Dynamo cannot trace its async all-reduce (async_op=True): a "
            "compiled TP block falls apart into many small graphs"
        )
    if ctx.tp_size > 1:
        apply_tensor_parallel(model, ctx)
    dmp = shard_sparse(
        model,
        ctx,
        constraints=config.constraints,
        fused_params=config.embedding_optimizer.fused_params(),
        batch_size=config.planner_batch_size,
        qcomm_codecs_registry=qcomm_registry(config.qcomms, ctx.device),
    )
    if config.compile_scope is not None:
        compile_dense_blocks(dmp.module, config.compile_scope)
    return ParallelModel(dmp, ctx, config, dmp.plan)


def compile_dense_blocks(model: nn.Module, scope: str = "block") -> None:
    """``ParallelizeConfig.compile_dense``: every HSTU block compiled in place with ``scope`` (names and state dicts
    unchanged, so sharding, gradient sync and checkpoints see the same parameters)."""
    if not hstu_encoders(model):
        raise ValueError(f"compile_dense needs an HSTUEncoder in the model; found none ({type(model).__name__})")
    from gr_models.modules.compile import compile_hstu_blocks

    compile_hstu_blocks(model, scope=scope)


def qcomm_registry(precision: str | None, device: torch.device) -> dict[str, Any] | None:
    """TorchRec's codecs for ``precision`` ("bf16" / "fp16") in both directions of the embedding all-to-alls."""
    if precision is None:
        return None
    from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs_registry

    comm = {"bf16": CommType.BF16, "fp16": CommType.FP16}[precision]
    return get_qcomm_codecs_registry(QCommsConfig(forward_precision=comm, backward_precision=comm), device=device)
