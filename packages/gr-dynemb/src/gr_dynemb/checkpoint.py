"""Full and incremental dumps of dynamic tables, written atomically.

File format (``torch.save`` of a dict, one file per table; version ``gr_dynemb.table/1``):

- ``format``: ``"gr_dynemb.table/1"``;
- ``dim``, ``value_dim``: embedding width and row width (embedding + optimizer state);
- ``config``: the ``DynamicTableConfig`` as a dict (informational; loading checks dims only);
- ``step``, ``epoch``: the table clocks at dump time;
- ``since_score``: None for a full dump, else the score threshold of an incremental dump (with LRU scores: rows
  touched at or after that step);
- ``keys`` int64 ``[n]``, ``values`` float32 ``[n, value_dim]``, ``scores`` uint64 ``[n]``.

An incremental dump holds rows changed since its threshold, not erasures; loading it on top of the previous full dump
gives the table's rows at dump time except for keys erased or evicted in between. Writes go to ``<path>.tmp`` and are
renamed into place, so a crash never leaves a torn file.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from gr_dynemb.table import DynamicHashTable, owner_ranks

FORMAT = "gr_dynemb.table/1"


def dump_table(table: DynamicHashTable, path: str | Path, *, since_score: int | None = None) -> int:
    """Writes every row (or those with score >= ``since_score``) to ``path``; returns the number of rows."""
    keys, values, scores = table.export_to_host(0 if since_score is None else since_score)
    payload = {
        "format": FORMAT,
        "dim": table.dim,
        "value_dim": table.value_dim,
        "config": dataclasses.asdict(table.config),
        "step": table.step,
        "epoch": table.epoch,
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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no table dump at {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} dump (format: {getattr(payload, 'get', lambda _: None)('format')})")
    return payload


def load_table(
    table: DynamicHashTable,
    path: str | Path,
    *,
    clear: bool | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> int:
    """Loads a dump into ``table`` (rows and scores); a full dump clears the table first unless ``clear=False``.

    With ``world_size > 1`` only the keys that ``owner_ranks`` gives to ``rank`` are loaded, so the dumps of any
    number of old shards can be re-sharded: every new rank loads every old dump (``load_shards``) and keeps its keys.
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
    keys, values, scores = payload["keys"], payload["values"], payload["scores"]
    if world_size > 1:
        mine = owner_ranks(keys, world_size) == rank
        keys, values, scores = keys[mine], values[mine], scores[mine]
    if keys.numel():
        table.restore(keys, values, scores)
    table.set_step(max(table.step, int(payload["step"])))
    table.set_epoch(max(table.epoch, int(payload["epoch"])))
    return int(keys.numel())


def load_shards(table: DynamicHashTable, paths: list[str | Path], *, rank: int = 0, world_size: int = 1) -> int:
    """Loads the full dumps of all old shards (any count) into this rank's table: the keys this rank owns under
    ``world_size`` shards. Clears the table first. Returns the number of rows loaded."""
    table.clear()
    return sum(load_table(table, p, clear=False, rank=rank, world_size=world_size) for p in paths)
