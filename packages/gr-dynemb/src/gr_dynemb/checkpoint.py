"""Full and incremental dumps of dynamic tables, written atomically.

File format (``torch.save`` of a dict, one file per table or shard; version ``gr_dynemb.table/2``):

- ``format``: ``"gr_dynemb.table/2"``;
- ``dim``, ``value_dim``: embedding width and row width (embedding + optimizer state);
- ``config``: the ``DynamicTableConfig`` as a dict (informational; loading checks dims only);
- ``step``, ``epoch``: the table clocks at dump time;
- ``optimizer_step``: the fused optimizer's step count (Adam's t) of the ``DynamicEmbedding`` that owns the table,
  or None for a bare table. It is not the clock: a table looked up k times per training step takes k optimizer steps
  per clock tick. In a sharded table every shard holds the same count;
- ``admission``: None, or the id-admission counters of a ``DynamicEmbedding`` with ``admit_after > 0`` (ids seen
  but not yet admitted, and in how many batches): a dict of ``keys`` int64 ``[m]``, ``counts`` float32 ``[m, 1]``,
  ``scores`` uint64 ``[m]``. Always every counter, even in an incremental dump (they are few, and a key admitted
  since the previous dump has left them);
- ``since_score``: None for a full dump, else the score threshold of an incremental dump (with LRU scores: rows
  touched at or after that step);
- ``keys`` int64 ``[n]``, ``values`` float32 ``[n, value_dim]``, ``scores`` uint64 ``[n]``.

Version 1 dumps (no ``optimizer_step``, no ``admission``) still load: ``load_embedding`` then resumes the optimizer
step from the table clock and starts the admission counters empty (the behaviour of the version 1 reader), and warns
with ``LegacyDumpWarning`` when that can change training (an Adam table, or a table with admission).

An incremental dump holds rows changed since its threshold, not erasures; loading it on top of the previous full dump
gives the table's rows at dump time except for keys erased or evicted in between. Writes go to ``<path>.tmp`` and are
renamed into place, so a crash never leaves a torn file.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gr_dynemb.table import DynamicHashTable, owner_ranks

if TYPE_CHECKING:
    from gr_dynemb.caching import CachingHashTable
    from gr_dynemb.embedding import DynamicEmbedding

FORMAT = "gr_dynemb.table/2"
READABLE_FORMATS = ("gr_dynemb.table/1", FORMAT)


class LegacyDumpWarning(UserWarning):
    """A version 1 dump (no optimizer step, no admission counters), or a ``DynamicEmbedding`` state dict without
    admission counters, was loaded into a table where they matter."""


def dump_table(
    table: DynamicHashTable | CachingHashTable,
    path: str | Path,
    *,
    since_score: int | None = None,
    optimizer_step: int | None = None,
    admission: DynamicHashTable | None = None,
) -> int:
    """Writes every row (or those with score >= ``since_score``) to ``path``, with the owning module's optimizer
    step count and admission counter table if given (``dump_embedding`` passes both); returns the number of rows."""
    if optimizer_step is not None and not 0 <= int(optimizer_step) < 2**63:
        raise ValueError(f"optimizer_step must be in [0, 2^63), got {optimizer_step}")
    keys, values, scores = table.export_to_host(0 if since_score is None else since_score)
    counters = None
    if admission is not None:
        if admission.dim != 1 or admission.value_dim != 1:
            raise ValueError(f"an admission counter table has rows of width 1, got {admission.value_dim}")
        c_keys, c_counts, c_scores = admission.export_to_host()
        counters = {"keys": c_keys, "counts": c_counts, "scores": c_scores}
    payload = {
        "format": FORMAT,
        "dim": table.dim,
        "value_dim": table.value_dim,
        "config": dataclasses.asdict(table.config),
        "step": table.step,
        "epoch": table.epoch,
        "optimizer_step": None if optimizer_step is None else int(optimizer_step),
        "admission": counters,
        "since_score": since_score,
        "keys": keys,
        "values": values,
        "scores": scores,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return int(keys.numel())


def read_dump(path: str | Path) -> dict:
    """A dump's payload; version 1 dumps come back with ``optimizer_step`` and ``admission`` None."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no table dump at {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt not in READABLE_FORMATS:
        raise ValueError(f"{path} is not a gr_dynemb.table dump of a known version {READABLE_FORMATS} (format: {fmt})")
    payload.setdefault("optimizer_step", None)
    payload.setdefault("admission", None)
    return payload


def load_table(
    table: DynamicHashTable | CachingHashTable,
    path: str | Path,
    *,
    clear: bool | None = None,
    rank: int = 0,
    world_size: int = 1,
    admission: DynamicHashTable | None = None,
    clear_admission: bool = True,
) -> int:
    """Loads a dump into ``table`` (rows and scores); a full dump clears the table first unless ``clear=False``.

    With ``world_size > 1`` only the keys that ``owner_ranks`` gives to ``rank`` are loaded, so the dumps of any
    number of old shards can be re-sharded: every new rank loads every old dump (``load_shards``) and keeps its keys.
    ``admission``: the loading module's counter table; the dump's counters of this rank's keys go into it (after
    clearing it, unless ``clear_admission=False``: ``load_shards`` merges the counters of several old shards).
    Returns the number of rows loaded.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    payload = read_dump(path)
    if payload["dim"] != table.dim or payload["value_dim"] != table.value_dim:
        raise ValueError(
            f"{path}: dump rows are dim {payload['dim']} / width {payload['value_dim']}, this table's "
            f"{table.dim} / {table.value_dim} (same embedding dim and optimizer needed)"
        )
    if clear if clear is not None else payload["since_score"] is None:
        table.clear()
    keys, values, scores = _mine(rank, world_size, payload["keys"], payload["values"], payload["scores"])
    if keys.numel():
        table.restore(keys, values, scores)
    table.set_step(max(table.step, int(payload["step"])))
    table.set_epoch(max(table.epoch, int(payload["epoch"])))
    if admission is not None:
        if clear_admission:
            admission.clear()
        counters = payload["admission"]
        if counters is not None:
            c_keys, c_counts, c_scores = _mine(
                rank, world_size, counters["keys"], counters["counts"], counters["scores"]
            )
            if c_keys.numel():
                admission.restore(c_keys, c_counts, c_scores)
    return int(keys.numel())


def load_shards(
    table: DynamicHashTable | CachingHashTable,
    paths: Sequence[str | Path],
    *,
    rank: int = 0,
    world_size: int = 1,
    admission: DynamicHashTable | None = None,
) -> int:
    """Loads the full dumps of all old shards (any count) into this rank's table: the keys this rank owns under
    ``world_size`` shards, and (with ``admission``) their admission counters. Clears the table (and the counters)
    first. Returns the number of rows loaded."""
    table.clear()
    if admission is not None:
        admission.clear()
    return sum(
        load_table(table, p, clear=False, rank=rank, world_size=world_size, admission=admission, clear_admission=False)
        for p in paths
    )


def dump_embedding(module: DynamicEmbedding, path: str | Path, *, since_score: int | None = None) -> int:
    """``dump_table`` of a ``DynamicEmbedding``'s table with its optimizer step count and admission counters."""
    return dump_table(module.table, path, since_score=since_score, optimizer_step=module.step, admission=module.counter)


def load_embedding(
    module: DynamicEmbedding, paths: str | Path | Sequence[str | Path], *, rank: int = 0, world_size: int = 1
) -> int:
    """Loads full dumps (one, or every old shard's) into ``module``: the rows and admission counters of the keys
    ``rank`` owns under ``world_size`` shards, and the optimizer step count, which every dump must agree on.
    Version 1 dumps resume the step from the table clock and the counters empty (with a ``LegacyDumpWarning`` where
    that matters). Returns the number of rows loaded."""
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    if not paths:
        raise ValueError("load_embedding needs at least one dump")
    payloads = [read_dump(p) for p in paths]
    partial = [str(p) for p, d in zip(paths, payloads, strict=True) if d["since_score"] is not None]
    if partial:
        raise ValueError(f"load_embedding loads full dumps; incremental: {partial} (apply those with load_table)")
    steps = {d["optimizer_step"] for d in payloads}
    if len(steps) > 1:
        shown = {str(p): d["optimizer_step"] for p, d in zip(paths, payloads, strict=True)}
        raise ValueError(f"the dumps disagree on the optimizer step count (one per table, on every shard): {shown}")
    rows = load_shards(module.table, paths, rank=rank, world_size=world_size, admission=module.counter)
    step = steps.pop()
    if step is None:  # a version 1 dump: the old behaviour, flagged where it can change training
        legacy = []
        if module.config.optimizer.kind == "adam":
            legacy.append(
                "Adam's step count resumes from the table clock (behind it if the table was looked up more than once "
                "per training step)"
            )
        if module.counter is not None:
            legacy.append("admission counters start empty (ids seen but not yet admitted are counted again)")
        if legacy:
            warnings.warn(f"{paths[0]} is a version 1 dump: " + "; ".join(legacy), LegacyDumpWarning, stacklevel=2)
        step = module.table.step
    module.step = int(step)
    return rows


def _mine(rank: int, world_size: int, keys: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(keys, *rest)`` restricted to the keys ``rank`` owns under ``world_size`` shards."""
    if world_size == 1:
        return (keys, *rest)
    mine = owner_ranks(keys, world_size) == rank
    return (keys[mine], *(t[mine] for t in rest))
