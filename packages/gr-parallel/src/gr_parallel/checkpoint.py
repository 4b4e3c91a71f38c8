"""Distributed checkpoints of a hybrid-parallel model: exact resume, and loading on another world size (re-shard).

Layout of ``<path>/`` (a directory on a file system every rank sees)::

    meta.json                    format, world/TP/DP sizes, every table and dense tensor with its shape
    sparse/                      torch.distributed.checkpoint: the sharded static tables and their fused optimizer
                                 state (TorchRec ShardedTensors; DCP re-shards them on load)
    dynamic/<table>/rank<r>-of-<W>.pt   gr-dynemb dumps of the dynamic tables (rows + optimizer state, clock,
                                 optimizer step count, admission counters)
    dense.pt                     the dense parameters and buffers in single-device form (rank 0)
    dense_optim.pt               the dense optimizers' states, by parameter name, in single-device form (rank 0)
    trainer.pt                   the caller's trainer state (rank 0)
    rng/rank<r>.pt               every rank's RNG states (python, numpy, torch, CUDA)

Every rank writes into ``<path>.tmp-<id>``; after a barrier rank 0 writes ``meta.json`` and renames the directory to
``<path>`` (an existing checkpoint there is replaced), so a crash mid-save never leaves a torn checkpoint under
``<path>`` and ``load_distributed`` refuses a directory without ``meta.json``.

Dense parameters are saved in single-device form (``gr_parallel.tensor_parallel.full_dense_state_dict`` under tensor
parallelism) so they load on any TP size. Dense optimizer states are data-parallel replicas (every DP rank steps the
same summed gradients), so any DP size loads them; their TP-sharded tensors (moments of head-split weights) are
gathered and re-split like the weights, so any TP size loads them too. RNG states are restored only on the world
size that wrote them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from gr_parallel.context import ParallelContext

FORMAT = "gr_parallel.checkpoint/1"
_DMP_PREFIX = "_dmp_wrapped_module."

Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | Mapping[str, torch.optim.Optimizer] | None


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model or optimizers it is loaded into (missing or extra table or tensor,
    different shape, different optimizer set)."""


@dataclass
class LoadedCheckpoint:
    """What ``load_distributed`` restored: the trainer state saved with it, the world size it was written on, and
    whether this rank's RNG states came back (only on the same world size)."""

    trainer_state: Any
    saved_world_size: int
    saved_tp_size: int
    rng_restored: bool


# ------------------------------------------------------------------------------------------ what the model holds
def _unwrap(model: nn.Module) -> nn.Module:
    """The TorchRec ``DistributedModelParallel`` of ``model`` (itself, or a ``ParallelModel``'s ``.dmp``); a model
    with no DMP is used as it is. State-dict keys and parameter names are the DMP's (without its wrapper prefix)."""
    from torchrec.distributed import DistributedModelParallel

    if isinstance(model, DistributedModelParallel):
        return model
    dmp = getattr(model, "dmp", None)
    return dmp if isinstance(dmp, DistributedModelParallel) else model


def _sharded_modules(model: nn.Module) -> dict[str, nn.Module]:
    """TorchRec sharded modules by state-dict prefix (DMP drops its wrapper's name from state-dict keys)."""
    from torchrec.distributed.types import ShardedModule

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, ShardedModule):
            found[name.replace(_DMP_PREFIX, "")] = module
    return found


def _dynamic_tables(model: nn.Module) -> dict[str, Any]:
    """Dynamic table shards by table name."""
    from gr_dynemb.distributed import ShardedDynamicEmbeddingCollection

    tables: dict[str, Any] = {}
    for module in model.modules():
        if isinstance(module, ShardedDynamicEmbeddingCollection):
            tables.update(module.dynamic_tables)
    return tables


def _dynamic_prefixes(model: nn.Module) -> list[str]:
    from gr_dynemb.distributed import ShardedDynamicEmbeddingCollection

    return [
        f"{prefix}.dynamic." if prefix else "dynamic."
        for prefix, m in _sharded_modules(model).items()
        if isinstance(m, ShardedDynamicEmbeddingCollection)
    ]


def _split_state(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(sparse: the sharded modules' static-table entries, dense: everything outside sharded modules) of the model's
    state dict. Dynamic tables' entries are in neither: they travel as gr-dynemb dumps."""
    prefixes = [p + "." if p else "" for p in _sharded_modules(model)]
    dynamic = _dynamic_prefixes(model)
    sparse, dense = {}, {}
    for key, value in model.state_dict().items():
        if any(key.startswith(p) for p in dynamic):
            continue
        if any(key.startswith(p) for p in prefixes):
            sparse[key] = value
        elif type(value) in (torch.Tensor, nn.Parameter) and not key.endswith("_extra_state"):
            dense[key] = value  # Megatron's _extra_state entries carry no weights
    return sparse, dense


def _full_dense(model: nn.Module, ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """Dense parameters and buffers in single-device names and shapes (a collective over the TP group when tp > 1)."""
    _, local = _split_state(model)
    if ctx.tp_size == 1:
        return {k: v.detach().cpu().clone() for k, v in local.items()}
    from gr_parallel.tensor_parallel import full_dense_state_dict

    full = full_dense_state_dict(model, ctx)
    sharded = [p + "." for p in _sharded_modules(model) if p]
    return {k: v.detach().cpu().clone() for k, v in full.items() if not any(k.startswith(p) for p in sharded)}


def _load_full_dense(model: nn.Module, state: dict[str, torch.Tensor], ctx: ParallelContext) -> None:
    if ctx.tp_size == 1:
        _, local = _split_state(model)
        with torch.no_grad():
            for key, target in local.items():
                target.copy_(state[key].to(target.device))
        return
    from gr_parallel.tensor_parallel import load_full_dense_state_dict

    load_full_dense_state_dict(model, state, ctx, strict=False)  # the keys were checked against meta.json


def _table_shapes(sparse: Mapping[str, Any], model: nn.Module) -> dict[str, list[int]]:
    shapes = {k: list(v.shape) for k, v in sparse.items()}
    for name, shard in _dynamic_tables(model).items():
        shapes[f"dynamic:{name}"] = [-1, int(shard.dim), int(shard.table.value_dim)]
    return shapes


def _fused_optimizer_state(model: nn.Module, sparse_keys: set[str]) -> dict[str, Any]:
    """The fused (in-backward) optimizer state of the static tables, keyed by their state-dict keys."""
    fused = getattr(model, "fused_optimizer", None)
    if fused is None:
        return {}
    state = fused.state_dict()["state"]
    dynamic = _dynamic_prefixes(model)
    lost = [k for k in state if k not in sparse_keys and not any(k.startswith(p) for p in dynamic)]
    if lost:  # a table's optimizer state the checkpoint would silently drop
        raise ValueError(f"fused optimizer state of {lost} matches no table entry of the model's state dict")
    return {k: v for k, v in state.items() if k in sparse_keys}


# ------------------------------------------------------------------------------------------ dense optimizers
def _named_optimizers(optimizers: Optimizers) -> dict[str, torch.optim.Optimizer]:
    if optimizers is None:
        return {}
    if isinstance(optimizers, torch.optim.Optimizer):
        named = {"0": optimizers}
    elif isinstance(optimizers, Mapping):
        named = {str(k): v for k, v in optimizers.items()}
    else:
        named = {str(i): o for i, o in enumerate(optimizers)}
    for name, opt in named.items():
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer {name!r} must be a torch.optim.Optimizer, got {type(opt).__name__}")
    return named


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n.replace(_DMP_PREFIX, "") for n, p in model.named_parameters()}


def _tp_layouts(model: nn.Module) -> dict[int, tuple[Any, dist.ProcessGroup]]:
    """id(parameter) -> (its ``HeadShard`` layout, TP group) for every tensor-parallel HSTU block's split weights."""
    from gr_parallel.tensor_parallel import sharded_tensors

    return sharded_tensors(model)


def _gather_tp(value: torch.Tensor, layout: Any, group: dist.ProcessGroup) -> torch.Tensor:
    shards = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, value.detach().contiguous(), group=group)
    return layout.unshard(shards)


def _optimizer_state_by_name(opt: torch.optim.Optimizer, names: dict[int, str], layouts: dict) -> dict[str, Any]:
    """The optimizer's state dict with parameters named instead of numbered and TP-split state tensors gathered
    into single-device form, so a model rebuilt elsewhere (another parameter order, world or TP size) maps it back.
    Under TP a collective over the TP group: every rank of it calls this."""
    sd = opt.state_dict()
    index_to_param: dict[int, torch.Tensor] = {}
    for group, sd_group in zip(opt.param_groups, sd["param_groups"], strict=True):
        for p, index in zip(group["params"], sd_group["params"], strict=True):
            if id(p) not in names:
                raise ValueError("a dense optimizer holds a parameter that is not in the model")
            index_to_param[index] = p
    state = {}
    for index in sorted(sd["state"]):  # the same order on every TP rank: the gathers pair up
        p = index_to_param[index]
        entry = {}
        for key, value in sd["state"][index].items():
            if id(p) in layouts and isinstance(value, torch.Tensor) and value.shape == p.shape:
                value = _gather_tp(value, *layouts[id(p)])
            entry[key] = _to_cpu(value)
        state[names[id(p)]] = entry
    groups = [{**g, "params": [names[id(index_to_param[i])] for i in g["params"]]} for g in sd["param_groups"]]
    return {"param_groups": groups, "state": state}


def _load_optimizer_state_by_name(
    opt: torch.optim.Optimizer,
    saved: dict[str, Any],
    names: dict[int, str],
    layouts: dict,
    ctx: ParallelContext,
    label: str,
) -> None:
    params = {names[id(p)]: p for g in opt.param_groups for p in g["params"]}
    groups = [sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups]
    saved_groups = [sorted(g["params"]) for g in saved["param_groups"]]
    if groups != saved_groups:
        raise CheckpointMismatchError(
            f"dense optimizer {label!r}: the checkpoint's parameter groups {saved_groups} differ from this "
            f"optimizer's {groups}"
        )
    index = {names[id(p)]: i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    state = {}
    for name, entry in saved["state"].items():
        p = params[name]
        local = {}
        for key, value in entry.items():
            if id(p) in layouts and isinstance(value, torch.Tensor) and value.dim() == p.dim() and value.dim() > 0:
                value = layouts[id(p)][0].shard(value, ctx.tp_rank, ctx.tp_size)  # this rank's heads
            local[key] = value
        state[index[name]] = local
    this_groups = [[index[names[id(p)]] for p in g["params"]] for g in opt.param_groups]
    sd = {
        "param_groups": [{**g, "params": ids} for g, ids in zip(saved["param_groups"], this_groups, strict=True)],
        "state": state,
    }
    opt.load_state_dict(sd)  # casts the state to each parameter's device and dtype


def _to_cpu(v: Any) -> Any:
    return v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v


# ------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """This process's RNG states: python, numpy, torch (CPU) and the current CUDA device's."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------ save
def _agree_on_id(ctx: ParallelContext) -> str:
    token = [uuid.uuid4().hex[:12] if ctx.rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    return str(token[0])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_distributed(
    path: str | Path,
    model: nn.Module,
    optimizers: Optimizers = None,
    trainer_state: Any = None,
    ctx: ParallelContext | None = None,
) -> Path:
    """Saves ``model`` (a sharded model: DMP or a module holding one), its fused table optimizers, the dense
    ``optimizers`` (one, a list, or a name -> optimizer mapping; match it on load), ``trainer_state`` (anything
    picklable, e.g. step counters) and every rank's RNG states into the directory ``path``. A collective: every rank
    calls it with the same ``path``. Returns the final path."""
    import torch.distributed.checkpoint as dcp

    from gr_dynemb.distributed import dump_sharded

    ctx = _context(ctx)
    model = _unwrap(model)
    final = Path(path)
    tmp = final.with_name(f"{final.name}.tmp-{_agree_on_id(ctx)}")
    sparse, _ = _split_state(model)
    dense = _full_dense(model, ctx)
    named = _named_optimizers(optimizers)
    fused = _fused_optimizer_state(model, set(sparse))
    if ctx.rank == 0:
        tmp.mkdir(parents=True, exist_ok=False)
    dist.barrier()
    error: BaseException | None = None
    try:
        if sparse:
            dcp.save({"model": sparse, "fused_optimizer": fused}, checkpoint_id=str(tmp / "sparse"))
        if _dynamic_tables(model):
            dump_sharded(model, tmp / "dynamic")
        if ctx.dp_rank == 0 and named:  # DP replicas hold the same states; the first TP group gathers its shards
            names, layouts = _param_names(model), _tp_layouts(model)
            states = {n: _optimizer_state_by_name(o, names, layouts) for n, o in named.items()}
            if ctx.rank == 0:
                _save(states, tmp / "dense_optim.pt")
        _save(rng_state(), tmp / "rng" / f"rank{ctx.rank}.pt")
        if ctx.rank == 0:
            _save(dense, tmp / "dense.pt")
            _save(trainer_state, tmp / "trainer.pt")
    except Exception as exc:  # reported to every rank below, then re-raised
        error = exc
    # Every rank reports: one that failed to write its part keeps the checkpoint unpublished on all of them.
    failed = torch.tensor([0.0 if error is None else 1.0], device=ctx.device)
    dist.all_reduce(failed)
    if failed.item() > 0:
        if ctx.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error
        raise RuntimeError(f"save_distributed: another rank failed to write its part of {final}; nothing published")
    if ctx.rank == 0:
        meta = {
            "format": FORMAT,
            "world_size": ctx.world_size,
            "tp_size": ctx.tp_size,
            "dp_size": ctx.dp_size,
            "tables": _table_shapes(sparse, model),
            "dense": {k: list(v.shape) for k, v in dense.items()},
            "optimizers": sorted(named),
            "torch": torch.__version__,
        }
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, final)
    dist.barrier()
    return final


def _publish(tmp: Path, final: Path) -> None:
    """Renames the finished ``tmp`` to ``final``, replacing an older checkpoint there."""
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{tmp.name.rsplit('-', 1)[1]}")
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old)


# ------------------------------------------------------------------------------------------ load
def read_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's ``meta.json``; a clear error for a missing, unfinished or foreign directory."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        what = "does not exist" if not path.exists() else "has no meta.json (an unfinished or foreign save)"
        raise FileNotFoundError(f"no gr_parallel checkpoint at {path}: the directory {what}")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is a {meta.get('format')!r} checkpoint; this reader understands {FORMAT!r}")
    return meta


def _check_compatible(meta: dict, tables: dict[str, list[int]], dense: dict[str, list[int]], path: Path) -> None:
    problems = []
    for what, saved, here in (("table", meta["tables"], tables), ("dense tensor", meta["dense"], dense)):
        missing = sorted(set(here) - set(saved))
        extra = sorted(set(saved) - set(here))
        if missing:
            problems.append(f"the model's {what}(s) {missing} are not in the checkpoint")
        if extra:
            problems.append(f"the checkpoint's {what}(s) {extra} are not in the model")
        for key in sorted(set(saved) & set(here)):
            if list(saved[key]) != list(here[key]):
                problems.append(f"{what} {key!r}: checkpoint shape {saved[key]}, model shape {here[key]}")
    if problems:
        raise CheckpointMismatchError(f"checkpoint {path} does not fit this model: " + "; ".join(problems))


def load_distributed(
    path: str | Path,
    model: nn.Module,
    optimizers: Optimizers = None,
    ctx: ParallelContext | None = None,
) -> LoadedCheckpoint:
    """Loads a ``save_distributed`` checkpoint into ``model`` (sharded the same way or on another world size: tables
    are re-sharded) and the dense ``optimizers`` (same names as saved; None skips them). Restores this rank's RNG
    states when the world size is the one that saved. A collective: every rank calls it. Raises
    ``CheckpointMismatchError`` naming every table or tensor that is missing, extra or of another shape."""
    import torch.distributed.checkpoint as dcp

    ctx = _context(ctx)
    model = _unwrap(model)
    path = Path(path)
    meta = read_meta(path)
    sparse, _ = _split_state(model)
    dense_shapes = {k: list(v.shape) for k, v in _full_dense(model, ctx).items()}
    _check_compatible(meta, _table_shapes(sparse, model), dense_shapes, path)
    named = _named_optimizers(optimizers)
    if named and sorted(named) != meta["optimizers"]:
        raise CheckpointMismatchError(
            f"checkpoint {path} holds dense optimizer(s) {meta['optimizers']}, not {sorted(named)}"
        )

    if sparse:
        fused_opt = getattr(model, "fused_optimizer", None)
        fused_sd = fused_opt.state_dict() if fused_opt is not None else {"state": {}}
        fused = {k: v for k, v in fused_sd["state"].items() if k in sparse}
        dcp.load({"model": sparse, "fused_optimizer": fused}, checkpoint_id=str(path / "sparse"))
        if fused_opt is not None and fused:
            fused_opt.load_state_dict(fused_sd)  # copies into the kernels' own state tensors
    if _dynamic_tables(model):
        _load_dynamic(model, path, meta)

    dense = torch.load(path / "dense.pt", map_location="cpu", weights_only=True)
    _load_full_dense(model, dense, ctx)
    if named:
        states = torch.load(path / "dense_optim.pt", map_location="cpu", weights_only=False)
        names, layouts = _param_names(model), _tp_layouts(model)
        for name, opt in named.items():
            _load_optimizer_state_by_name(opt, states[name], names, layouts, ctx, name)

    same_world = meta["world_size"] == ctx.world_size
    if same_world:
        set_rng_state(torch.load(path / "rng" / f"rank{ctx.rank}.pt", weights_only=False))
    trainer_state = torch.load(path / "trainer.pt", weights_only=False)
    dist.barrier()
    return LoadedCheckpoint(trainer_state, meta["world_size"], meta["tp_size"], same_world)


def _load_dynamic(model: nn.Module, path: Path, meta: dict[str, Any]) -> None:
    """The dynamic tables' rows, admission counters and optimizer step counts from the gr-dynemb dumps. Checkpoints
    written before those dumps carried the step count (version 1 dumps) hold it in ``meta.json`` as
    ``dynamic_steps``: it is taken from there (the dumps' fallback, the table clock, falls behind it when a table is
    looked up more than once per training step)."""
    from gr_dynemb.checkpoint import LegacyDumpWarning
    from gr_dynemb.distributed import load_sharded

    legacy_steps = meta.get("dynamic_steps")
    with warnings.catch_warnings():
        if legacy_steps is not None:  # the step is set below; only lost admission counters are worth a warning
            warnings.simplefilter("ignore", LegacyDumpWarning)
        load_sharded(model, path / "dynamic")
    if legacy_steps is None:
        return
    for name, shard in _dynamic_tables(model).items():
        shard.step = int(legacy_steps[name])
        if shard.counter is not None:
            warnings.warn(
                f"{path}: the dumps of dynamic table {name!r} predate admission counters; they start empty (ids seen "
                "but not yet admitted are counted again)",
                LegacyDumpWarning,
                stacklevel=3,
            )


def _context(ctx: ParallelContext | None) -> ParallelContext:
    if ctx is not None:
        return ctx
    from gr_parallel.context import get_context

    return get_context()
