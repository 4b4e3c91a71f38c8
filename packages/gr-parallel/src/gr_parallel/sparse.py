"""Model-parallel embeddings: every embedding collection of a model sharded by TorchRec over the whole world.

``shard_sparse`` plans all tables of a model in one plan with gr-dynemb's dynamic-aware planner and shards them with
``DistributedModelParallel``: static tables on TorchRec's fused kernels (their optimizer runs inside backward, from
``fused_params``), dynamic tables (gr-dynemb hash tables) on gr-dynemb's sharder. Dense parameters are left alone
(a no-op data-parallel wrapper): ``gr_parallel.dense`` synchronises them over the data-parallel group.

Gradient bookkeeping. Every rank of a tensor-parallel group reads the same local batch, so each looked-up row comes
back to its owner ``tp`` times per data-parallel slice. The embedding outputs' gradients are therefore scaled so
that a table sees exactly the SUM over data-parallel ranks of their gradients (the trainer normalises its loss by
the global count, see ``dense.global_count``): ``1 / tp``, times the world size when TorchRec's gradient division
(``torchrec.distributed.comm_ops``, on by default) divides the returning gradients by it.

Data-parallel (replicated) tables: a collection whose tables are all constrained to ``sharding_types=
["data_parallel"]`` is left unsharded (see ``replicated_collections``); its weights are ordinary dense parameters,
summed over the DP group and trained by the dense optimizer, and its outputs are not scaled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, JaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.model_parallel import DataParallelWrapper
from torchrec.distributed.planner import ParameterConstraints, Topology
from torchrec.distributed.types import LazyAwaitable, ShardingEnv, ShardingPlan

if TYPE_CHECKING:
    from gr_parallel.context import ParallelContext

DATA_PARALLEL = "data_parallel"
# fbgemm-gpu-cpu (1.8) runs an EmbeddingCollection only on the fused kernel; on CUDA TorchRec's planner picks among
# its kernels unless a constraint says otherwise.
CPU_STATIC_KERNELS = ["fused"]
# Where a static table has no constraint, the planner chooses among these (never data_parallel on its own: a
# replicated table changes which optimizer trains it, so it must be asked for; other types via constraints).
DEFAULT_STATIC_SHARDINGS = ["row_wise", "table_wise"]

_FBGEMM_OPTIMIZERS = {"sgd": "EXACT_SGD", "adagrad": "EXACT_ADAGRAD", "rowwise_adagrad": "EXACT_ROWWISE_ADAGRAD"}


def fused_params_for(kind: str, lr: float, *, eps: float = 1e-8, beta1: float = 0.9, beta2: float = 0.999) -> dict:
    """TorchRec ``fused_params`` of a table optimizer named like gr-dynemb's ``FusedOptimizerConfig.kind`` ("sgd",
    "adagrad", "rowwise_adagrad", "adam"; FBGEMM's CPU kernel has no Adam, so "adam" trains static tables only on
    CUDA). Dynamic tables without their own optimizer take the same one."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    if kind == "adam":
        opt = EmbOptimType.ADAM
    elif kind in _FBGEMM_OPTIMIZERS:
        opt = getattr(EmbOptimType, _FBGEMM_OPTIMIZERS[kind])
    else:
        raise ValueError(f"table optimizer must be one of {sorted([*_FBGEMM_OPTIMIZERS, 'adam'])}, got {kind!r}")
    if lr <= 0:
        raise ValueError(f"table learning rate must be > 0, got {lr}")
    return {"optimizer": opt, "learning_rate": lr, "eps": eps, "beta1": beta1, "beta2": beta2}


class NoDataParallel(DataParallelWrapper):
    """DMP's data-parallel hook left empty: dense gradients are ours (``gr_parallel.dense``), over the DP group
    only, which DDP over the whole world would get wrong under tensor parallelism."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        # TorchRec's DDP wrapper is what moves the dense part to the device; without it we do.
        dmp._dmp_wrapped_module.to(device)


# ------------------------------------------------------------------------------------------ finding the tables
def _dynamic_collection_type() -> type | None:
    try:
        from gr_dynemb import DynamicEmbeddingCollection
    except ImportError:
        return None
    return DynamicEmbeddingCollection


def embedding_tables(model: nn.Module) -> dict[str, tuple[str, str]]:
    """``{table: (module path, "static" | "dynamic")}`` of every embedding collection in ``model``. Table names must
    be unique across the model: plans and constraints are keyed by table name."""
    dynamic_type = _dynamic_collection_type()
    found: dict[str, tuple[str, str]] = {}
    for path, module in model.named_modules():
        if isinstance(module, EmbeddingCollection):
            names, kind = [c.name for c in module.embedding_configs()], "static"
        elif dynamic_type is not None and isinstance(module, dynamic_type):
            names, kind = list(module._tables), "dynamic"
        else:
            continue
        for name in names:
            if name in found:
                raise ValueError(
                    f"table {name!r} appears in both {found[name][0] or '<root>'} and {path or '<root>'}; table names "
                    "must be unique across the model"
                )
            found[name] = (path, kind)
    return found


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def swap_dynamic_collections(model: nn.Module, device: torch.device) -> dict[str, Any]:
    """Replaces every gr-dynemb ``DynamicEmbeddingCollection`` in ``model`` (in place) by a TorchRec
    ``EmbeddingCollection`` of the same tables and features, and returns ``{table: DynamicParameterConstraints}``
    carrying each table's settings (table, optimizer, initializer, admission, eval policy), so that static and
    dynamic tables shard in one plan. A table that already holds rows cannot be swapped (its rows would be lost):
    shard the model before training it, or load the rows after sharding (``gr_dynemb.distributed.load_sharded``)."""
    dynamic_type = _dynamic_collection_type()
    if dynamic_type is None:
        return {}
    from gr_dynemb.distributed import DynamicParameterConstraints, DynamicTableOptions

    if isinstance(model, dynamic_type):
        raise ValueError("shard_sparse needs a model holding the DynamicEmbeddingCollection, not the collection itself")
    constraints: dict[str, Any] = {}
    paths = [p for p, m in model.named_modules() if isinstance(m, dynamic_type)]
    for path in paths:
        collection = model.get_submodule(path)
        configs: list[EmbeddingConfig] = []
        for name, table in collection._tables.items():
            rows = int(table.table.size())
            if rows:
                raise ValueError(
                    f"dynamic table {name!r} at {path} already holds {rows} rows; shard the model before training "
                    "it (or load its rows after sharding with gr_dynemb.distributed.load_sharded)"
                )
            cfg = table.config
            t = cfg.table
            features = [f for f, owner in collection._table_of.items() if owner == name]
            options = DynamicTableOptions(
                capacity=t.capacity,
                max_capacity=t.max_capacity,
                policy=t.policy,
                initializer=t.initializer,
                max_load_factor=t.max_load_factor,
                num_threads=t.num_threads,
                admit_after=cfg.admit_after,
                default_value=cfg.default_value,
                eval_missing=cfg.eval_missing,
                optimizer=cfg.optimizer,
                # On NCCL the rows travel on the GPU: the shard lives on this rank's GPU.
                device="cuda" if device.type == "cuda" else t.device,
                hbm_budget_bytes=t.hbm_budget_bytes,
                cache_capacity=t.cache_capacity,
            )
            constraints[name] = DynamicParameterConstraints(dynamic=options)
            # num_embeddings only sizes the planner's estimate; the rows live in the hash table. The weight is never
            # used (the dynamic sharder replaces it), so it is not allocated.
            configs.append(
                EmbeddingConfig(name=name, embedding_dim=t.dim, num_embeddings=t.capacity, feature_names=features)
            )
        _set_submodule(model, path, EmbeddingCollection(tables=configs, device=torch.device("meta")))
    return constraints


def resolve_constraints(
    tables: Mapping[str, tuple[str, str]], constraints: Mapping[str, ParameterConstraints] | None, device: torch.device
) -> dict[str, ParameterConstraints]:
    """The plan constraints: the user's, checked against the model's tables, with defaults for static tables where
    the user set none (row- or table-wise; on the CPU the fused kernel)."""
    from gr_dynemb.distributed import DynamicParameterConstraints

    given = dict(constraints or {})
    unknown = sorted(set(given) - set(tables))
    if unknown:
        raise ValueError(f"constraints name tables {unknown} that the model does not have (tables: {sorted(tables)})")
    out: dict[str, ParameterConstraints] = {}
    for name, (_, kind) in tables.items():
        c = given.get(name)
        if c is not None and not isinstance(c, ParameterConstraints):
            raise TypeError(f"constraints[{name!r}] must be a torchrec ParameterConstraints, got {type(c).__name__}")
        if kind == "dynamic":
            if c is not None and not isinstance(c, DynamicParameterConstraints):
                raise ValueError(
                    f"table {name!r} is a dynamic (hash) table; constrain it with gr_dynemb's "
                    "DynamicParameterConstraints, not a plain ParameterConstraints"
                )
            continue  # the swap's constraints (or the user's DynamicParameterConstraints) apply
        if isinstance(c, DynamicParameterConstraints):
            raise ValueError(
                f"table {name!r} is a static EmbeddingCollection table; DynamicParameterConstraints are for "
                "gr-dynemb tables (build the model with the dynamic table instead)"
            )
        c = dataclasses.replace(c) if c is not None else ParameterConstraints()
        if c.sharding_types is not None and DATA_PARALLEL in c.sharding_types and len(c.sharding_types) > 1:
            raise ValueError(
                f"table {name!r}: data_parallel must be the only sharding type of a table (a replicated table is "
                f"trained by the dense optimizer, a sharded one by its fused optimizer), got {c.sharding_types}"
            )
        if c.sharding_types is None:
            c.sharding_types = list(DEFAULT_STATIC_SHARDINGS)
        if device.type == "cpu" and c.compute_kernels is None:
            c.compute_kernels = ["dense"] if c.sharding_types == [DATA_PARALLEL] else list(CPU_STATIC_KERNELS)
        out[name] = c
    return out


def replicated_collections(model: nn.Module, constraints: Mapping[str, ParameterConstraints]) -> list[str]:
    """Paths of the collections whose tables are all constrained to ``data_parallel``. They are not sharded:
    TorchRec's data-parallel sharding wraps the lookups in DDP over the whole world (averaging, and double-counting
    the TP ranks) and its dense kernel does not run an EmbeddingCollection on the CPU. Left as plain modules their
    weights are dense parameters: summed over the DP group with the rest and trained by the dense optimizer."""
    out = []
    for path, module in model.named_modules():
        if not isinstance(module, EmbeddingCollection):
            continue
        names = [c.name for c in module.embedding_configs()]
        dp = [n for n in names if _is_replicated(constraints.get(n))]
        if dp and len(dp) != len(names):
            raise ValueError(
                f"collection {path or '<root>'} mixes data-parallel tables {dp} with sharded ones "
                f"{sorted(set(names) - set(dp))}; put the data-parallel tables in a collection of their own"
            )
        if dp:
            out.append(path)
    return out


def _is_replicated(c: ParameterConstraints | None) -> bool:
    return c is not None and list(c.sharding_types or []) == [DATA_PARALLEL]


# ------------------------------------------------------------------------------------------ gradient scaling
class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale()`` (read when backward runs)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: Callable[[], float]) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        s = ctx.scale()
        return (grad if s == 1.0 else grad * s), None


def embedding_grad_scale(ctx: ParallelContext) -> Callable[[], float]:
    """The factor on sharded tables' output gradients that makes each table see the DP-summed gradient."""
    from torchrec.distributed import comm_ops

    def scale() -> float:
        divided = ctx.world_size if comm_ops.get_gradient_division() else 1
        return divided / ctx.tp_size

    return scale


def _scaled_outputs(features: set[str], scale: Callable[[], float]) -> Callable[[Any], Any]:
    def apply(out: Mapping[str, JaggedTensor]) -> dict[str, JaggedTensor]:
        result = {}
        for f, jt in out.items():
            if f in features:
                jt = JaggedTensor(values=_ScaleGrad.apply(jt.values(), scale), lengths=jt.lengths(), weights=None)
            result[f] = jt
        return result

    return apply


def install_grad_scaling(
    sharded: nn.Module, features: set[str], scale: Callable[[], float]
) -> torch.utils.hooks.RemovableHandle:
    """Scales the gradients of ``features``' outputs of a sharded collection (its forward returns a lazy awaitable
    of the feature dict, or the dict)."""
    apply = _scaled_outputs(features, scale)

    def hook(module: nn.Module, args: Any, out: Any) -> Any:
        if isinstance(out, LazyAwaitable):
            out.callbacks.append(apply)
            return out
        return apply(out)

    return sharded.register_forward_hook(hook)


# ------------------------------------------------------------------------------------------ the entry point
def shard_sparse(
    model: nn.Module,
    ctx: ParallelContext,
    *,
    constraints: Mapping[str, ParameterConstraints] | None = None,
    fused_params: dict[str, Any] | None = None,
    batch_size: int | None = None,
    plan: ShardingPlan | None = None,
    qcomm_codecs_registry: dict[str, Any] | None = None,
) -> DistributedModelParallel:
    """Shards every embedding table of ``model`` over all ``ctx.world_size`` ranks and returns the
    ``DistributedModelParallel`` (``.module`` is ``model`` with its collections replaced by sharded ones; dense
    parameters are moved to ``ctx.device`` and otherwise untouched).

    ``constraints``: per-table TorchRec ``ParameterConstraints`` (sharding types, compute kernels; data-parallel
    for small tables: ``sharding_types=["data_parallel"]``) or gr-dynemb ``DynamicParameterConstraints`` for
    dynamic tables (a model's gr-dynemb collections are swapped in with their own settings when not given).
    ``fused_params``: the static tables' fused optimizer (``fused_params_for``), also the default of dynamic tables
    without their own. ``batch_size``: the per-rank batch the planner costs (TorchRec's default when None).
    ``plan``: a plan to reuse (e.g. to load a checkpoint into the same layout) instead of planning.
    ``qcomm_codecs_registry``: TorchRec's quantized-comms codecs of the sharded tables' all-to-alls
    (``get_qcomm_codecs_registry``; None: fp32 comms).

    Every rank must call this with identically built models (same table initialisation)."""
    from gr_dynemb.distributed import (
        DynamicEmbeddingCollectionSharder,
        DynamicEmbeddingShardingPlanner,
        with_dynamic_options,
    )

    if isinstance(model, DistributedModelParallel):
        raise ValueError("the model is already sharded (a DistributedModelParallel)")
    tables = embedding_tables(model)
    if not tables:
        raise ValueError("the model holds no EmbeddingCollection or DynamicEmbeddingCollection to shard")
    if fused_params is not None and not isinstance(fused_params, dict):
        raise TypeError(f"fused_params must be a dict (see fused_params_for), got {type(fused_params).__name__}")
    if not dist.is_initialized():
        raise RuntimeError("shard_sparse needs torch.distributed initialised (gr_parallel.initialize)")
    cons = resolve_constraints(tables, constraints, ctx.device)
    swapped = swap_dynamic_collections(model, ctx.device)
    for name, c in swapped.items():
        cons[name] = (constraints or {}).get(name, c)  # a user's DynamicParameterConstraints wins

    replicated = replicated_collections(model, cons)
    features_by_path = {
        path: {c.name: list(c.feature_names) for c in m.embedding_configs()}
        for path, m in model.named_modules()
        if isinstance(m, EmbeddingCollection)
    }
    sharders = [
        DynamicEmbeddingCollectionSharder(fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry)
    ]
    world = dist.group.WORLD
    if plan is None:
        planner = DynamicEmbeddingShardingPlanner(
            Topology(world_size=ctx.world_size, compute_device=ctx.device.type),
            batch_size=batch_size,
            constraints=cons,
        )
        plan = planner.collective_plan(model, sharders, world)
    else:
        dynamic = {n: c.dynamic for n, c in cons.items() if hasattr(c, "dynamic")}
        plan = with_dynamic_options(plan, dynamic)
    for path in replicated:
        plan.plan.pop(path, None)  # left unsharded: its weights are dense parameters, replicated on every rank
    for path, module_plan in plan.plan.items():
        for name, ps in module_plan.items():
            if ps.sharding_type == DATA_PARALLEL:
                raise ValueError(
                    f"the plan puts table {name!r} at {path} on TorchRec's data_parallel sharding, whose DDP would "
                    "average its gradients over the whole world; mark the table data_parallel in the constraints "
                    "instead (its collection then stays unsharded and trains with the dense parameters)"
                )
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(world),
        device=ctx.device,
        plan=plan,
        sharders=sharders,
        data_parallel_wrapper=NoDataParallel(),
    )
    scale = embedding_grad_scale(ctx)
    dmp._gr_grad_scaling = []  # type: ignore[attr-defined]
    for path, module_plan in plan.plan.items():
        sharded = dmp.module.get_submodule(path) if path else dmp.module
        features = set()
        for name in module_plan:
            features.update(features_by_path[path][name])
        if features:
            dmp._gr_grad_scaling.append(install_grad_scaling(sharded, features, scale))  # type: ignore[attr-defined]
    return dmp


def table_parameters(dmp: nn.Module) -> set[int]:
    """ids of the parameters trained inside backward by a fused table optimizer (TorchRec marks them with
    ``_in_backward_optimizers``): the dense optimizer, gradient sync and clipping must skip them."""
    return {id(p) for p in dmp.parameters() if getattr(p, "_in_backward_optimizers", None)}
