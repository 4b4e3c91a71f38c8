"""Training lookups of several ``DynamicEmbedding`` tables in one pass: ``grouped_train_lookup``.

A collection looks up many tables per step. One table at a time, each table pays for its own de-duplication sort,
its own host synchronisations (the unique count, the reserved-key check) and its own gradient aggregation, so ten
tables cost ten times the launches and stalls. Tables that share a table device, an output device and a dim form a
group here, and the group shares that work:

- one de-duplication of the batch's (table, id) pairs: a stable sort by id, then a stable sort by table, so every
  table's unique ids are contiguous and ascending (the order ``torch.unique`` gives one table);
- one host synchronisation per step: the cumulative unique counts per table and the smallest id (the two reserved
  ids are the smallest int64 values, so one number tells whether the batch holds one);
- per table, one native ``find_or_insert_embeddings`` writing the embeddings straight into its slice of one buffer;
- one gather to the batch's order; in backward, one gradient aggregation (``index_add_``), the fused optimizer of
  each table on its slice, and the dropped-gradient counts of all tables in one pass.

Semantics are those of each table's own ``DynamicEmbedding`` lookup: same rows, statuses, scores, clocks, optimizer
steps and errors. A batch with a reserved id, or with no ids at all, takes the per-table path, which processes the
tables in order and raises at the first reserved id.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gr_dynemb.table import ERASED_KEY

if TYPE_CHECKING:
    from gr_dynemb.embedding import DynamicEmbedding


def groupable(module: DynamicEmbedding) -> bool:
    """Whether the module's lookups take the grouped path now: training, no admission counter."""
    return module.training and module.counter is None


def group_key(module: DynamicEmbedding) -> tuple[torch.device, torch.device, int]:
    """Modules with equal keys can share one grouped lookup: table device, output device, dim."""
    return module.table.device, module._anchor.device, module.dim


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

    def find_or_insert(t: int) -> None:
        a, b = batch.bounds[t], batch.bounds[t + 1]
        modules[t].table.set_step(modules[t].step + 1)
        modules[t].table.find_or_insert_embeddings(batch.keys[a:b], rows[a:b], status[a:b], keys_checked=True)

    for_each_table(device, len(modules), find_or_insert)
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


def for_each_table(device: torch.device, num_tables: int, run: Callable[[int], None]) -> None:
    """``run(t)`` for every table. On a GPU the tables' calls go round-robin to side streams (joined before this
    returns, also on error): one table's kernels are small and end in a tail of waits on its busiest bucket locks,
    and kernels of different streams fill each other's tails. The tables are independent, so order does not matter."""
    if device.type != "cuda" or num_tables == 1:
        for t in range(num_tables):
            run(t)
        return
    main = torch.cuda.current_stream(device)
    streams = _side_streams(device, min(num_tables, _SIDE_STREAMS))
    for s in streams:
        s.wait_stream(main)
    try:
        for t in range(num_tables):
            with torch.cuda.stream(streams[t % len(streams)]):
                run(t)
    finally:
        for s in streams:
            main.wait_stream(s)  # the buffers (allocated on main) are freed on main only after the side work


_SIDE_STREAMS = 8


@functools.cache
def _side_streams(device: torch.device, n: int) -> list[torch.cuda.Stream]:
    return [torch.cuda.Stream(device) for _ in range(n)]


def sum_rows(grad: Tensor, index: Tensor, num_rows: int) -> Tensor:
    """``out[r] = sum of grad[i] over i with index[i] == r``: ``[num_rows, dim]``. ATen's embedding backward: a sort
    of ``index`` and segment sums in bounded chunks, so a hot row (power-law ids put ~10% of a batch on one) is
    summed by many threads instead of serialising atomics on its address as ``index_add_`` does; deterministic."""
    return torch.ops.aten.embedding_dense_backward(grad, index, num_rows, -1, False)


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

        def optimizer_step(t: int) -> None:
            a, b = bounds[t], bounds[t + 1]
            modules[t].optimizer_step(keys[a:b], summed[a:b], found=found[a:b], distinct=True)

        for_each_table(keys.device, len(modules), optimizer_step)
        # Dropped gradients per table (ids without a slot) from one running count.
        missed = torch.zeros(keys.numel() + 1, dtype=torch.int64, device=keys.device)
        torch.cumsum(~found, 0, out=missed[1:])
        at = torch.tensor(bounds).to(keys.device, non_blocking=True)
        per_table = missed.index_select(0, at).diff()
        torch._foreach_add_([m._unadmitted for m in modules], list(per_table.unbind(0)))
        return None, None, None, None
