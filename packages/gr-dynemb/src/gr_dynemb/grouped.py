"""Training lookups of several ``DynamicEmbedding`` tables in one pass: ``grouped_train_lookup``.

A collection looks up many tables per step. One table at a time, each table pays for its own de-duplication sort,
its own host synchronisations (the unique count, the reserved-key check) and its own gradient aggregation, so ten
tables cost ten times the launches and stalls. Tables that share a table device, an output device and a dim form a
group here, and the group shares that work:

- one de-duplication of the batch's (table, id) pairs: a stable sort by id, then a stable sort by table, so every
  table's unique ids are contiguous and ascending (the order ``torch.unique`` gives one table);
- one host synchronisation per step: the cumulative unique counts per table and the smallest id (the two reserved
  ids are the smallest int64 values, so one number tells whether the batch holds one);
- one native ``find_or_insert_embeddings_group`` for all tables (one kernel launch on a GPU; the tables' short
  kernels would each pay a launch and a tail of bucket-lock waits), writing the embeddings into one buffer;
- one gather to the batch's order; in backward, one gradient aggregation (``index_add_``), one native
  ``apply_optimizer_group`` (each table with its own optimizer and step, no bucket locks: the ids are distinct),
  and the dropped-gradient counts of all tables in one pass.

Groups of more than ``MAX_GROUP_TABLES`` tables make one native call per ``MAX_GROUP_TABLES`` tables.

Semantics are those of each table's own ``DynamicEmbedding`` lookup: same rows, statuses, scores, clocks, optimizer
steps and errors. A batch with a reserved id, or with no ids at all, takes the per-table path, which processes the
tables in order and raises at the first reserved id.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gr_dynemb.table import (
    ERASED_KEY,
    MAX_GROUP_TABLES,
    DynamicHashTable,
    apply_optimizer_group,
    find_or_insert_embeddings_group,
)

if TYPE_CHECKING:
    from gr_dynemb.embedding import DynamicEmbedding


def groupable(module: DynamicEmbedding) -> bool:
    """Whether the module's lookups take the grouped path now: training, no admission counter, one table (a
    caching table moves rows between its tiers in its own lookup)."""
    return module.training and module.counter is None and isinstance(module.table, DynamicHashTable)


def group_key(module: DynamicEmbedding) -> tuple[torch.device, torch.device, int]:
    """Modules with equal keys can share one grouped lookup: table device, output device, dim."""
    return module.table.device, module._anchor.device, module.dim


def lookup_tables(modules: Sequence[DynamicEmbedding], ids: Sequence[Tensor]) -> list[Tensor]:
    """``[modules[i](ids[i]) for i]``: the training lookups of modules that share a ``group_key`` together
    (``grouped_train_lookup``), the others (evaluation, admission) one module at a time."""
    if len(modules) != len(ids):
        raise ValueError(f"need one id tensor per module, got {len(modules)} modules and {len(ids)} id tensors")
    out: list[Tensor | None] = [None] * len(modules)
    groups: dict[tuple[torch.device, torch.device, int], list[int]] = {}
    for i, (m, x) in enumerate(zip(modules, ids, strict=True)):
        if groupable(m) and isinstance(x, Tensor) and x.dtype == torch.int64:
            groups.setdefault(group_key(m), []).append(i)
        else:
            out[i] = m(x)  # its own lookup (and its own errors)
    for members in groups.values():
        looked_up = grouped_train_lookup([modules[i] for i in members], [ids[i] for i in members])
        for i, rows in zip(members, looked_up, strict=True):
            out[i] = rows
    return out  # type: ignore[return-value]


@dataclass
class _Batch:
    """The group's de-duplicated batch: ``keys[bounds[t]:bounds[t + 1]]`` are table t's unique ids (ascending);
    ``inverse[i]`` is the position in ``keys`` of the batch's i-th id (tables' ids concatenated in order)."""

    keys: Tensor
    inverse: Tensor
    bounds: list[int]


def grouped_train_lookup(modules: Sequence[DynamicEmbedding], ids: Sequence[Tensor]) -> list[Tensor]:
    """``[modules[i](ids[i]) for i]`` for distinct modules with one ``group_key``, all ``groupable``: embeddings
    ``[*ids[i].shape, dim]`` each, sharing de-duplication, host synchronisation and gradient aggregation."""
    if len(modules) != len(ids) or not modules:
        raise ValueError(f"need one id tensor per module, got {len(modules)} modules and {len(ids)} id tensors")
    if len({id(m) for m in modules}) != len(modules):
        raise ValueError("a module can appear only once in a grouped lookup")
    if len({group_key(m) for m in modules}) != 1:
        raise ValueError(
            f"grouped modules must share table device, output device and dim, got {[group_key(m) for m in modules]}"
        )
    for m, x in zip(modules, ids, strict=True):
        if not groupable(m):
            raise ValueError("grouped lookups are for modules in training mode without admission (admit_after=0)")
        if not isinstance(x, Tensor) or x.dtype != torch.int64:
            raise TypeError(f"ids must be int64, got {getattr(x, 'dtype', type(x).__name__)}")
    device = modules[0].table.device
    flats = [x.reshape(-1).to(device) for x in ids]
    batch = _dedup(flats, device) if sum(f.numel() for f in flats) else None
    if batch is None:  # no ids, or a reserved one (the per-table path names it)
        return [m._lookup_one(x) for m, x in zip(modules, ids, strict=True)]
    dim = modules[0].dim
    rows = torch.empty(batch.keys.numel(), dim, device=device)
    status = torch.empty(batch.keys.numel(), dtype=torch.int8, device=device)
    for lo, hi in _chunks(len(modules)):
        for m in modules[lo:hi]:
            m.table.set_step(m.step + 1)
        a, b = batch.bounds[lo], batch.bounds[hi]
        find_or_insert_embeddings_group(
            [m.table for m in modules[lo:hi]], batch.keys[a:b], _rebased(batch.bounds, lo, hi), rows[a:b], status[a:b]
        )
    if torch.is_grad_enabled():
        out = _GroupedLookup.apply(modules[0]._grad_anchor, modules, batch, rows)
    else:
        out = rows.index_select(0, batch.inverse)
    pieces = out.split([f.numel() for f in flats])
    anchor = modules[0]._anchor.device
    return [p.reshape(*x.shape, dim).to(anchor) for p, x in zip(pieces, ids, strict=True)]


def _dedup(flats: list[Tensor], device: torch.device) -> _Batch | None:
    """One sort-based de-duplication of (table, id) pairs and one host synchronisation; None if an id is reserved."""
    counts = [f.numel() for f in flats]
    n = sum(counts)
    keys = torch.cat(flats) if len(flats) > 1 else flats[0]
    by_key, order = torch.sort(keys, stable=True)
    new = torch.empty(n, dtype=torch.bool, device=device)  # the first of its (table, id) run in sorted order
    new[:1] = True
    if len(flats) > 1:
        # Stable sorts: by id, then by table -> (table, id) order, the batch order among equal pairs.
        starts = torch.tensor(list(itertools.accumulate(counts[:-1]))).to(device, non_blocking=True)
        table = torch.bucketize(order, starts, out_int32=True, right=True)  # table of each sorted id
        by_table, second = torch.sort(table, stable=True)
        order = order[second]
        sorted_keys = by_key[second]
        torch.ne(sorted_keys[1:], sorted_keys[:-1], out=new[1:])
        new[1:] |= by_table[1:] != by_table[:-1]
    else:
        sorted_keys = by_key
        torch.ne(sorted_keys[1:], sorted_keys[:-1], out=new[1:])
    unique_pos = torch.cumsum(new, 0)  # 1-based position of each sorted id's pair among the unique pairs
    # Table t fills sorted positions [c_t, c_{t+1}) (c: cumulative id counts): unique_pos at c_{t+1} - 1 is the
    # cumulative unique count through table t (0 before any id).
    ends = [0, *itertools.accumulate(counts)]
    last = torch.tensor([max(e - 1, 0) for e in ends[1:]]).to(device, non_blocking=True)
    stats = torch.cat([unique_pos.index_select(0, last), by_key[:1]]).tolist()  # the one host synchronisation
    if stats[-1] <= ERASED_KEY:  # EMPTY_KEY and ERASED_KEY are the two smallest int64 values
        return None
    bounds = [0] + [u if e > 0 else 0 for u, e in zip(stats[:-1], ends[1:], strict=True)]
    unique_pos -= 1
    unique_keys = torch.empty(bounds[-1], dtype=torch.int64, device=device).index_copy_(0, unique_pos, sorted_keys)
    inverse = torch.empty(n, dtype=torch.int64, device=device).index_copy_(0, order, unique_pos)
    return _Batch(unique_keys, inverse, bounds)


def _chunks(num_tables: int) -> list[tuple[int, int]]:
    """Table ranges of at most MAX_GROUP_TABLES tables: one native call each."""
    return [(lo, min(lo + MAX_GROUP_TABLES, num_tables)) for lo in range(0, num_tables, MAX_GROUP_TABLES)]


def _rebased(bounds: list[int], lo: int, hi: int) -> list[int]:
    return [b - bounds[lo] for b in bounds[lo : hi + 1]]


def _optimizer(m: DynamicEmbedding) -> tuple[str, float, float, float, float, int]:
    o = m.config.optimizer
    return o.kind, o.lr, o.eps, o.beta1, o.beta2, m.step


def sum_rows(grad: Tensor, index: Tensor, num_rows: int) -> Tensor:
    """``out[r] = sum of grad[i] over i with index[i] == r``: ``[num_rows, dim]``."""
    return torch.zeros(num_rows, grad.shape[-1], dtype=grad.dtype, device=grad.device).index_add_(0, index, grad)


class _GroupedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor: Tensor, modules: Sequence[DynamicEmbedding], batch: _Batch, rows: Tensor):  # type: ignore[override]
        ctx.modules, ctx.batch = modules, batch
        return rows.index_select(0, batch.inverse)

    @staticmethod
    @torch.no_grad()
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        modules: Sequence[DynamicEmbedding] = ctx.modules
        batch: _Batch = ctx.batch
        keys, bounds = batch.keys, batch.bounds
        summed = sum_rows(grad.detach().to(keys.device, torch.float32), batch.inverse, keys.numel())
        found = torch.empty(keys.numel(), dtype=torch.bool, device=keys.device)
        for m in modules:
            m.step += 1
        for lo, hi in _chunks(len(modules)):
            a, b = bounds[lo], bounds[hi]
            apply_optimizer_group(
                [m.table for m in modules[lo:hi]], keys[a:b], _rebased(bounds, lo, hi), summed[a:b],
                [_optimizer(m) for m in modules[lo:hi]], found[a:b], distinct=True,
            )  # fmt: skip
        # Dropped gradients per table (ids without a slot) from one running count.
        missed = torch.zeros(keys.numel() + 1, dtype=torch.int64, device=keys.device)
        torch.cumsum(~found, 0, out=missed[1:])
        at = torch.tensor(bounds).to(keys.device, non_blocking=True)
        per_table = missed.index_select(0, at).diff()
        torch._foreach_add_([m._unadmitted for m in modules], list(per_table.unbind(0)))
        return None, None, None, None
