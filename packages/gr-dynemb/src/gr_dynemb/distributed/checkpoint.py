"""Per-rank dumps of sharded dynamic tables, re-sharded on load.

Layout: ``<directory>/<table>/rank<r>-of-<W>.pt``, one ``gr_dynemb.table`` dump (see ``gr_dynemb.checkpoint``)
per rank; each rank writes its own file atomically. Loading reads every dump of a table, whatever ``W`` it was
written with, and keeps the keys that ``owner_ranks`` gives to the loading rank under the current world size: their
rows and their admission counters. The optimizer step count (one per table, the same on every shard) comes back
exactly; version 1 dumps, which lack it, resume it from the table clock (see ``gr_dynemb.checkpoint``).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from gr_dynemb.checkpoint import dump_embedding, load_embedding
from gr_dynemb.collection import DynamicEmbeddingCollection
from gr_dynemb.distributed.sharded_collection import ShardedDynamicEmbeddingCollection
from gr_dynemb.embedding import DynamicEmbedding


def _tables(module: nn.Module) -> tuple[dict[str, DynamicEmbedding], int, int]:
    """Every dynamic table in ``module`` (a DMP model, a sharded or an unsharded dynamic collection, or anything
    holding them) by table name, with this process's rank and world size."""
    tables: dict[str, DynamicEmbedding] = {}
    ranks: set[tuple[int, int]] = set()
    for path, m in module.named_modules():
        if isinstance(m, ShardedDynamicEmbeddingCollection):
            found, rank_world = dict(m.dynamic_tables), (m.rank, m.world_size)
        elif isinstance(m, DynamicEmbeddingCollection):
            found, rank_world = {name: m.table(name) for name in m._tables}, (0, 1)
        else:
            continue
        ranks.add(rank_world)
        for name, emb in found.items():
            if name in tables:
                raise ValueError(f"two dynamic tables are named {name!r} (the second in {path or 'the root'})")
            tables[name] = emb
    if not tables:
        raise ValueError(f"{type(module).__name__} holds no dynamic table")
    if len(ranks) != 1:
        raise ValueError(f"dynamic collections disagree on (rank, world_size): {sorted(ranks)}")
    rank, world = ranks.pop()
    return tables, rank, world


def shard_paths(directory: str | Path, table: str) -> list[Path]:
    """The dumps of ``table`` under ``directory`` (every rank of the world size it was written with)."""
    paths = sorted((Path(directory) / table).glob("rank*-of-*.pt"))
    if not paths:
        raise FileNotFoundError(f"no dumps of table {table!r} under {directory}")
    worlds = {p.stem.split("-of-")[1] for p in paths}
    if len(worlds) != 1 or len(paths) != int(worlds.pop()):
        raise ValueError(f"{Path(directory) / table}: dumps of more than one world size, or some ranks missing")
    return paths


def dump_sharded(module: nn.Module, directory: str | Path, *, since_score: int | None = None) -> dict[str, int]:
    """Writes this rank's shard of every dynamic table in ``module`` (a DMP model or a collection), with its
    optimizer step count and admission counters; returns rows written per table. Call on every rank."""
    tables, rank, world = _tables(module)
    written = {}
    for name, emb in tables.items():
        written[name] = dump_embedding(
            emb, Path(directory) / name / f"rank{rank}-of-{world}.pt", since_score=since_score
        )
    return written


def load_sharded(module: nn.Module, directory: str | Path) -> dict[str, int]:
    """Loads every table's full dumps (any old world size) into this rank's shards of the dynamic tables in
    ``module``: rows, admission counters and the optimizer step count; returns rows loaded per table."""
    tables, rank, world = _tables(module)
    loaded = {}
    for name, emb in tables.items():
        loaded[name] = load_embedding(emb, shard_paths(directory, name), rank=rank, world_size=world)
    return loaded
