"""Tensor-parallel HSTU blocks built from Megatron-Core layers, converted from gr-models' single-device blocks.

Heads are split over the TP group: rank ``r`` of ``tp`` owns heads ``[r * H/tp, (r+1) * H/tp)``.

- ``input_norm`` (LayerNorm over D) is replicated.
- ``uvqk`` is a Megatron ``ColumnParallelLinear``. The single-device weight is laid out ``[U | V | Q | K]`` (each
  part head-major), so a rank's shard is its heads' rows of EACH part, concatenated: ``[U_r | V_r | Q_r | K_r]``.
  Its backward all-reduces the input gradient over the TP group.
- attention runs on the local heads only (no communication).
- ``attn_norm`` is a LayerNorm over all ``H * Dv`` features; with heads split, its mean and variance come from sums
  all-reduced over the TP group (``TensorParallelLayerNorm``); its weight/bias are split with the heads.
- ``output`` is a Megatron ``RowParallelLinear``: partial products all-reduced, bias added once after the reduce.
- the relative attention bias is shared by all heads (``[B, 1, N, N]``), so it stays replicated; each rank's
  gradient of it covers only its heads, so its (small) parameter gradients are all-reduced over the TP group.

After ``backward`` every replicated parameter holds the same full gradient on every TP rank (so data-parallel sync
runs over the DP group only) and every sharded parameter holds its shard of the full gradient. Sharded parameters
carry Megatron's attributes (``tensor_model_parallel=True``, ``partition_dim``); replicated ones do not.
``full_dense_state_dict`` / ``load_full_dense_state_dict`` translate between TP shards and the single-device names
and shapes, so checkpoints do not depend on the TP size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gr_models.modules.hstu import HSTUBlock, HSTUConfig, HSTUEncoder, block_norm
from gr_models.modules.relative_bias import RelativeBucketedTimeAndPositionBias
from gr_parallel.context import ParallelContext


@dataclass(frozen=True)
class HeadShard:
    """How a parameter is split by heads: along ``dim`` the full tensor is the concatenation of ``parts`` (sizes of
    head-major blocks, e.g. U, V, Q, K); a rank's shard is its ``1/tp`` slice of every part, concatenated."""

    dim: int
    parts: tuple[int, ...]

    def shard(self, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
        if full.shape[self.dim] != sum(self.parts):
            raise ValueError(f"expected size {sum(self.parts)} along dim {self.dim}, got shape {tuple(full.shape)}")
        return torch.cat([part.chunk(tp, self.dim)[rank] for part in full.split(self.parts, self.dim)], self.dim)

    def unshard(self, shards: list[torch.Tensor]) -> torch.Tensor:
        tp = len(shards)
        local = [p // tp for p in self.parts]
        per_rank = [s.split(local, self.dim) for s in shards]
        return torch.cat([per_rank[r][k] for k in range(len(self.parts)) for r in range(tp)], self.dim)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the backward sums the gradients too: each rank's consumer of the (replicated) result
    only sees its own features, so the full gradient of the sum is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _AllReduceSum.apply(x, group) if dist.get_world_size(group) > 1 else x


class TensorParallelLayerNorm(nn.Module):
    """LayerNorm over a last dimension of ``full_features`` whose columns are split over the TP group: this rank holds
    ``local_features`` of them (and their weight/bias). Mean and variance (two-pass, as ``nn.LayerNorm``) use sums
    all-reduced over the group, so the result equals the single-device LayerNorm's columns of this rank."""

    def __init__(
        self,
        full_features: int,
        local_features: int,
        group: dist.ProcessGroup,
        eps: float,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.full_features = full_features
        self.local_features = local_features
        self.group = group
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(local_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(local_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.local_features:
            raise ValueError(f"expected {self.local_features} local features, got shape {tuple(x.shape)}")
        # In fp32 like nn.LayerNorm under autocast (whose result is then fp32 too); otherwise in x's dtype.
        autocast = torch.is_autocast_enabled(x.device.type)
        xf = x.float() if autocast else x
        mean = _all_reduce_sum(xf.sum(-1, keepdim=True), self.group) / self.full_features
        centred = xf - mean
        var = _all_reduce_sum(centred.square().sum(-1, keepdim=True), self.group) / self.full_features
        normed = centred * torch.rsqrt(var + self.eps)
        if autocast:
            return normed * self.weight.float() + self.bias.float()
        return normed * self.weight + self.bias

    def extra_repr(self) -> str:
        return f"{self.local_features} of {self.full_features}, eps={self.eps}"


class TensorParallelRelativeBias(RelativeBucketedTimeAndPositionBias):
    """The shared relative attention bias, replicated on every TP rank. Each rank's blocks use the bias only for their
    heads, so its parameters enter the computation through Megatron's copy-to-TP-region (identity forward, all-reduce
    backward): their gradients are then the full ones on every rank, at the cost of all-reducing two small vectors
    (not the ``[B, 1, N, N]`` bias). Same parameter names and forward as the single-device module."""

    def __init__(self, max_seq_len: int, num_time_buckets: int, log_base: float, group: dist.ProcessGroup) -> None:
        super().__init__(max_seq_len, num_time_buckets, log_base)
        self.group = group
        # A plain twin whose code the forward runs with this module's (TP-mapped) parameters swapped in, so the bias
        # logic stays in gr-models. Kept out of the module tree: its own two small parameters are never used.
        twin = RelativeBucketedTimeAndPositionBias(max_seq_len, num_time_buckets, log_base)
        object.__setattr__(self, "_twin", twin)

    @classmethod
    def from_module(
        cls, module: RelativeBucketedTimeAndPositionBias, group: dist.ProcessGroup
    ) -> TensorParallelRelativeBias:
        new = cls(module.max_seq_len, module.num_time_buckets, module.log_base, group)
        new.load_state_dict(module.state_dict())
        p = module.position_weights
        return new.to(device=p.device, dtype=p.dtype)

    def forward(self, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        params = {
            name: copy_to_tensor_model_parallel_region(p, group=self.group)
            for name, p in self.named_parameters(recurse=False)
        }
        return torch.func.functional_call(self._twin, params, args, kwargs)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _megatron_config(dtype: torch.dtype, tp: int):
    from megatron.core.model_parallel_config import ModelParallelConfig

    # CPU initialisation works on every device (the shards are loaded from the single-device weights afterwards).
    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=dtype,
        sequence_parallel=False,
        gradient_accumulation_fusion=False,
    )


class TensorParallelHSTUBlock(nn.Module):
    """An ``HSTUBlock`` with its heads split over the TP group (see the module doc). Same ``forward``, ``project``,
    ``finish`` (and inference ``forward_with_past``/``forward_into_keys``) signatures; ``project`` returns the local
    heads' ``U [n, h * Dv]``, ``V [n, h, Dv]``, ``Q``, ``K [n, h, Dqk]``, ``h = H / tp``; ``finish`` takes the local
    heads' attention and returns the full (replicated) block output. Parameter names match the single-device block.

    Build one with ``from_block`` (or ``tensor_parallel_hstu`` for a whole encoder)."""

    def __init__(self, config: HSTUConfig, ctx: ParallelContext, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        tp = ctx.tp_size
        h, dqk, dv = config.num_heads, config.qk_dim, config.v_dim
        if h % tp:
            raise ValueError(f"num_heads {h} is not divisible by the tensor-parallel size {tp}")
        self.config = config
        self.tp_size, self.tp_rank, self.tp_group = tp, ctx.tp_rank, ctx.tp_group
        self.local_heads = h // tp
        hl = self.local_heads
        self._split = [hl * dv, hl * dv, hl * dqk, hl * dqk]
        mcfg = _megatron_config(dtype, tp)
        self.input_norm = nn.LayerNorm(config.embedding_dim, eps=config.layer_norm_eps, dtype=dtype)
        self.uvqk = ColumnParallelLinear(
            config.embedding_dim,
            2 * h * (dv + dqk),
            config=mcfg,
            init_method=nn.init.zeros_,
            bias=True,
            gather_output=False,
            skip_bias_add=True,  # added in _column_parallel (dtype-matched under autocast)
            tp_group=ctx.tp_group,
        )
        self.attn_norm = TensorParallelLayerNorm(h * dv, hl * dv, ctx.tp_group, config.layer_norm_eps, dtype=dtype)
        for p in (self.attn_norm.weight, self.attn_norm.bias):
            set_tensor_model_parallel_attributes(p, True, 0, 1)
        self.output = RowParallelLinear(
            h * dv,
            config.embedding_dim,
            config=mcfg,
            init_method=nn.init.zeros_,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=True,  # added once after the reduce in _row_parallel
            tp_group=ctx.tp_group,
        )
        self.dropout = nn.Dropout(config.dropout)

    def shard_layout(self) -> dict[str, HeadShard]:
        """Parameter name -> how it is split by heads (parameters not listed are replicated)."""
        h, dqk, dv = self.config.num_heads, self.config.qk_dim, self.config.v_dim
        uvqk = HeadShard(0, (h * dv, h * dv, h * dqk, h * dqk))
        features = HeadShard(0, (h * dv,))
        return {
            "uvqk.weight": uvqk,
            "uvqk.bias": uvqk,
            "attn_norm.weight": features,
            "attn_norm.bias": features,
            "output.weight": HeadShard(1, (h * dv,)),
        }

    @classmethod
    def from_block(cls, block: HSTUBlock, ctx: ParallelContext) -> TensorParallelHSTUBlock:
        """The TP form of a single-device block: this rank's shards of its weights, on the block's device/dtype."""
        weight = block.uvqk.weight
        new = cls(block.config, ctx, dtype=weight.dtype).to(weight.device)
        new.load_full_state(block.state_dict())
        new.train(block.training)
        return new

    @torch.no_grad()
    def load_full_state(self, state: dict[str, torch.Tensor]) -> None:
        """Loads single-device names/shapes (an ``HSTUBlock.state_dict()``), keeping this rank's shards."""
        layout = self.shard_layout()
        own = {k: v for k, v in self.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"block state mismatch: missing {missing}, unexpected {unexpected}")
        for name, param in own.items():
            value = state[name]
            if name in layout:
                value = layout[name].shard(value, self.tp_rank, self.tp_size)
            if value.shape != param.shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} does not fit {tuple(param.shape)}")
            param.copy_(value)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        uvqk = self._column_parallel(self._input_norm(x))
        u, v, q, k = F.silu(uvqk).split(self._split, dim=-1)
        h = self.local_heads
        return u, v.reshape(-1, h, cfg.v_dim), q.reshape(-1, h, cfg.qk_dim), k.reshape(-1, h, cfg.qk_dim)

    def _input_norm(self, x: torch.Tensor) -> torch.Tensor:
        # HSTUConfig.fused_norms fuses the replicated input norm as in HSTUBlock; the attention-output norm stays
        # TensorParallelLayerNorm, whose statistics are sums over the TP group (the fused op sees one rank's rows).
        return block_norm(self.input_norm, x, fused=self.config.fused_norms)

    def finish(self, x: torch.Tensor, u: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        y = u * self.attn_norm(attn.reshape(-1, self.local_heads * self.config.v_dim))
        return x + self._row_parallel(self._sharded_dropout(y))

    # Megatron's linear autograd function re-enters autocast in its backward only for CUDA (custom_fwd/custom_bwd
    # with device_type="cuda"), so under CPU autocast its backward would multiply bf16 gradients by fp32 weights.
    # Under any autocast the layers therefore get inputs and weights already in the autocast dtype, with autocast
    # off inside: the same bf16 matmuls as nn.Linear under autocast, on every device.
    def _column_parallel(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.uvqk
        dtype = _autocast_dtype(x)
        if dtype is None:
            out, bias = layer(x)
            return out + bias
        with torch.autocast(x.device.type, enabled=False):
            out, bias = layer(x.to(dtype), weight=layer.weight.to(dtype))
            return out + bias.to(dtype)

    def _row_parallel(self, y: torch.Tensor) -> torch.Tensor:
        layer = self.output
        dtype = _autocast_dtype(y)
        if dtype is None:
            out, bias = layer(y)
            return out + bias
        from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region
        from megatron.core.tensor_parallel.layers import linear_with_grad_accumulation_and_async_allreduce

        # RowParallelLinear.forward takes no weight argument: its two steps with the cast weight.
        with torch.autocast(y.device.type, enabled=False):
            partial = linear_with_grad_accumulation_and_async_allreduce(
                y.to(dtype),
                layer.weight.to(dtype),
                None,
                gradient_accumulation_fusion=False,
                allreduce_dgrad=False,
                sequence_parallel=False,
                tp_group=layer.tp_group,
            )
            return reduce_from_tensor_model_parallel_region(partial, group=layer.tp_group) + layer.bias.to(dtype)

    def _sharded_dropout(self, y: torch.Tensor) -> torch.Tensor:
        """Dropout of this rank's columns. Every TP rank must drop independently (its columns are different
        features), yet stay reproducible from the global RNG: a seed drawn from torch's default CPU generator
        (consumed identically on every rank) offset by the TP rank seeds this call's mask."""
        p = self.dropout.p
        if not self.training or p == 0.0 or self.tp_size == 1:
            return self.dropout(y)
        seed = int(torch.randint(0, 2**62, (1,)).item()) + self.tp_rank
        gen = torch.Generator(device=y.device).manual_seed(seed)
        keep = torch.rand(y.shape, generator=gen, device=y.device, dtype=y.dtype) >= p
        return y * keep / (1.0 - p)

    # The attention and the inference paths are the single-device block's own code: they only call project,
    # _attention and finish, and read config fields that do not depend on the head split.
    forward = HSTUBlock.forward
    _project_and_residual = HSTUBlock._project_and_residual  # project(x) and x (its TP project, not the fused norm)
    _attention = HSTUBlock._attention
    forward_with_past = HSTUBlock.forward_with_past
    forward_into_keys = HSTUBlock.forward_into_keys


def tensor_parallel_hstu(encoder: HSTUEncoder, ctx: ParallelContext) -> HSTUEncoder:
    """Converts every block of ``encoder`` in place to its TP form (this rank's shards of the current weights) and
    its relative bias to the TP-aware replicated form; returns the encoder. Every rank of a TP group must convert
    the same single-device weights (e.g. built from the same seed or loaded from one checkpoint)."""
    if not isinstance(encoder, HSTUEncoder):
        raise TypeError(f"tensor_parallel_hstu converts an HSTUEncoder, got {type(encoder).__name__}")
    heads = encoder.config.num_heads
    if heads % ctx.tp_size:
        raise ValueError(f"num_heads {heads} is not divisible by the tensor-parallel size {ctx.tp_size}")
    for i, block in enumerate(encoder.blocks):
        if isinstance(block, TensorParallelHSTUBlock):
            raise ValueError(f"block {i} is already tensor-parallel")
        encoder.blocks[i] = TensorParallelHSTUBlock.from_block(block, ctx)
    rb = encoder.relative_bias
    if rb is not None and not isinstance(rb, TensorParallelRelativeBias):
        encoder.relative_bias = TensorParallelRelativeBias.from_module(rb, ctx.tp_group)
        encoder.relative_bias.train(rb.training)
    return encoder


def sharded_tensors(model: nn.Module) -> dict[int, tuple[HeadShard, dist.ProcessGroup]]:
    """id(parameter) -> its head split and TP group, for every TP block inside ``model``."""
    found: dict[int, tuple[HeadShard, dist.ProcessGroup]] = {}
    for module in model.modules():
        if isinstance(module, TensorParallelHSTUBlock):
            params = dict(module.named_parameters())
            for name, layout in module.shard_layout().items():
                found[id(params[name])] = (layout, module.tp_group)
    return found


def _dense_entries(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict(keep_vars=True)`` less Megatron's ``_extra_state`` entries and anything that is not a plain
    tensor (TorchRec's sharded tables are ShardedTensor/DTensor: checkpointed by torch.distributed.checkpoint)."""
    out = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state") or not isinstance(value, torch.Tensor):
            continue
        if type(value) not in (torch.Tensor, nn.Parameter):
            continue
        out[name] = value
    return out


def _gather(shard: torch.Tensor, layout: HeadShard, group: dist.ProcessGroup) -> torch.Tensor:
    tp = dist.get_world_size(group)
    if tp == 1:
        return shard.detach()
    shards = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(shards, shard.detach().contiguous(), group=group)
    return layout.unshard(shards)


def full_dense_state_dict(model: nn.Module, ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """The dense state of ``model`` in single-device names and shapes: TP shards all-gathered over the TP group,
    replicated tensors as they are (detached, not copied). A collective over the TP group: every rank calls it.
    Entries that are not plain tensors (TorchRec's sharded tables) are left out."""
    sharded = sharded_tensors(model)
    out = {}
    for name, value in _dense_entries(model).items():
        spec = sharded.get(id(value))
        out[name] = _gather(value, *spec) if spec is not None else value.detach()
    return out


def full_dense_grads(model: nn.Module, ctx: ParallelContext) -> dict[str, torch.Tensor | None]:
    """The parameters' gradients in single-device names and shapes (None where a parameter has none); a collective
    over the TP group, as ``full_dense_state_dict``."""
    sharded = sharded_tensors(model)
    out: dict[str, torch.Tensor | None] = {}
    for name, param in model.named_parameters():
        spec = sharded.get(id(param))
        grad = param.grad
        if spec is not None:
            # All ranks of the group must join the gather: a missing gradient gathers as zeros, reported as None.
            has = torch.tensor([float(grad is not None)], device=param.device)
            dist.all_reduce(has, group=spec[1], op=dist.ReduceOp.MIN)
            full = _gather(grad if grad is not None else torch.zeros_like(param), *spec)
            out[name] = full if has.item() == 1.0 else None
        else:
            out[name] = None if grad is None else grad.detach()
    return out


@torch.no_grad()
def load_full_dense_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], ctx: ParallelContext, *, strict: bool = True
) -> None:
    """The inverse of ``full_dense_state_dict``: copies single-device names/shapes into ``model``, keeping this rank's
    shard of each TP-sharded tensor. No communication (every rank needs the full ``state``). ``strict``: every dense
    entry of the model must be in ``state`` and nothing else."""
    sharded = sharded_tensors(model)
    entries = _dense_entries(model)
    if strict:
        missing, unexpected = sorted(set(entries) - set(state)), sorted(set(state) - set(entries))
        if missing or unexpected:
            raise KeyError(f"dense state mismatch: missing {missing}, unexpected {unexpected}")
    for name, target in entries.items():
        if name not in state:
            continue
        value = state[name]
        spec = sharded.get(id(target))
        if spec is not None:
            layout, group = spec
            if dist.get_world_size(group) != ctx.tp_size:
                raise ValueError(f"{name}: TP group of size {dist.get_world_size(group)}, context says {ctx.tp_size}")
            value = layout.shard(value.to(target.device), ctx.tp_rank, ctx.tp_size)
        if value.shape != target.shape:
            raise ValueError(f"{name}: shape {tuple(value.shape)} does not fit {tuple(target.shape)}")
        target.copy_(value)


__all__ = [
    "HeadShard",
    "TensorParallelHSTUBlock",
    "TensorParallelLayerNorm",
    "TensorParallelRelativeBias",
    "full_dense_grads",
    "full_dense_state_dict",
    "load_full_dense_state_dict",
    "tensor_parallel_hstu",
]
