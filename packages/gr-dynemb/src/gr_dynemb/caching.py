"""Caching storage: a table on the GPU caching the hot rows of a host-memory table that holds every row.

``DynamicTableConfig(..., device="cuda", cache_capacity=C)`` (built with ``make_table``) gives a
``CachingHashTable``: a CPU ``DynamicHashTable`` (the *host table*, host memory, sized by ``capacity`` /
``max_capacity``) holds every admitted key, and a ``DynamicHashTable`` of ``C`` slots on ``device`` (the *cache*, all
in HBM, the table's score policy) holds copies of the recently used rows. The cache is authoritative for the keys it
holds (the optimizer updates rows there); the host table's copy of a cached key is stale until written back.

Why a cache next to the hybrid tier (``hbm_budget_bytes``): the hybrid table places a row in HBM or host memory by
its slot, i.e. by hash, so under skewed traffic the hot keys' rows are in host memory as often as cold ones and
every lookup of them crosses PCIe through UVA (measured at 7-50 GB/s, falling with the size of the host tier:
docs/benchmarks/dynemb_hybrid.md). The cache keeps exactly the keys the eviction policy ranks highest in HBM and
fills all of its slots, so with power-law ids most lookups never leave HBM; only misses and write-backs move rows,
in bulk copies through pinned buffers (``tools/bench_dynemb_caching.py`` measures both modes). The host table's
side of a write-back runs on a writer thread, overlapping the rest of the training step; every access to the host
table waits for it first.

A training lookup (``find_or_insert``):

1. ``find`` in the cache (touching scores) serves the hits;
2. the misses go to the host table (``find_or_insert`` there, so new keys get the initializer's row and a host slot;
   with LFU policies their host scores are read too, so a cached key keeps counting from its total);
3. the misses' rows move to the GPU and are inserted into the cache with ``insert_or_assign_evicting``; the rows
   the cache evicts for them (embedding and optimizer state, with their scores) are written back to the host table.

Keys the host table rejects (full bucket, see ``DynamicHashTable``) are not cached, as a single table gives them no
slot; keys the cache rejects (its bucket is full of keys scoring at least as high, e.g. all touched this step under
LRU) stay in the host table only. ``apply_optimizer`` updates cached rows in the cache and every other present row
in the host table, so a key evicted between a lookup and its backward still gets its update.

Semantics equal those of one table holding the same keys (rows, optimizer states, statuses and, since write-backs
carry the cache's scores, scores), given a host table that never has to evict (``max_capacity`` for every key).
Every cached key has a host slot, so a write-back never evicts: when the host table evicts a key (it is full), the
key leaves the cache too (a pass over the cache, only then). It evicts by the scores it holds, which for cached keys
are those from when they were loaded, so a full host table may pick other victims than one table would.

``size``, ``capacity``, ``export``, ``erase_if`` and the counters are the host table's after ``flush``
(``export``, ``export_to_host`` and ``erase_if`` flush first); ``insert_or_assign``, ``assign``, ``accumulate``,
``restore`` and ``erase`` write the affected cached rows back (or drop them) and then act on the host table.
``find`` reads the cache and then the host table without loading anything into the cache. Policies: ``lru``,
``lfu``, ``epoch_lru``, ``epoch_lfu`` (the cache has to evict by scores). ``hits``, ``misses`` and ``write_backs``
count keys looked up in the cache, keys it missed, and rows written back on eviction.

A CPU cache (``device="cpu"``) works the same way (tests run it); on a GPU the cache is a CUDA table.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from gr_dynemb.table import (
    BUCKET_SIZE,
    ERASED_KEY,
    EVICTED,
    FOUND,
    REJECTED,
    RESERVED_KEYS,
    DynamicHashTable,
    DynamicTableConfig,
    _table_device,
)

_SCORE_READING_POLICIES = ("lfu", "epoch_lfu")  # a cached key's score continues from the host table's count


def make_table(
    config: DynamicTableConfig, state_dim: int = 0, device: str | torch.device | None = None
) -> DynamicHashTable | CachingHashTable:
    """The table a config describes: a ``CachingHashTable`` for caching storage (``cache_capacity``), else a
    ``DynamicHashTable``."""
    if config.cache_capacity is not None:
        return CachingHashTable(config, state_dim=state_dim, device=device)
    return DynamicHashTable(config, state_dim=state_dim, device=device)


def cache_slots(cache_capacity: int) -> int:
    """Slots of the cache for a requested ``cache_capacity``: whole buckets, a power of two of them, at most the
    request (at least one bucket), so the cache never takes more memory than asked."""
    buckets = max(1, cache_capacity // BUCKET_SIZE)
    return BUCKET_SIZE * (1 << (buckets.bit_length() - 1))


class CachingHashTable:
    """A host-memory table with a cache on ``device``; the methods of ``DynamicHashTable`` (tensors on ``device``)
    plus ``flush``. See the module docstring."""

    def __init__(
        self, config: DynamicTableConfig, state_dim: int = 0, device: str | torch.device | None = None
    ) -> None:
        if config.cache_capacity is None:
            raise ValueError("a CachingHashTable needs config.cache_capacity (the cache's slots)")
        self.config = config
        self.device = _table_device(config.device if device is None else device)
        base = dataclasses.replace(config, cache_capacity=None, hbm_budget_bytes=None)
        self._host = DynamicHashTable(dataclasses.replace(base, device="cpu"), state_dim=state_dim)
        # Evicted rows are written back to the host table on this thread while the caller's step goes on; every
        # access to the host table (the ``host`` property) waits for it first.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gr_dynemb-write-back")
        self._pending: Future | None = None
        slots = cache_slots(config.cache_capacity)
        # A fixed-size cache that fills every slot (load factor 1) and evicts by the table's policy.
        cache_cfg = dataclasses.replace(base, capacity=slots, max_capacity=slots, max_load_factor=1.0)
        self.cache = DynamicHashTable(cache_cfg, state_dim=state_dim, device=self.device)
        self.dim = config.dim
        self.value_dim = self.host.value_dim
        self.step = 0
        self.epoch = 0
        self.hits = 0
        self.misses = 0
        self.write_backs = 0

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def host(self) -> DynamicHashTable:
        """The host table, once the write-back in flight (if any) has landed (its error, if any, is raised here)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
        return self._host

    # ------------------------------------------------------------------ moving rows between the tiers
    def _to_host(self, t: Tensor) -> Tensor:
        """A device tensor in (pinned) host memory; waits for the copy."""
        return self._to_host_all(t)[0]

    def _to_host_all(self, *tensors: Tensor) -> list[Tensor]:
        """Device tensors in pinned host memory, copied asynchronously and waited for once."""
        if not self.is_cuda:
            return list(tensors)
        out = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for o, t in zip(out, tensors, strict=True):
            o.copy_(t, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return out

    def _to_device(self, t: Tensor) -> Tensor:
        """A host tensor on the device (asynchronous from pinned memory)."""
        return t.to(self.device, non_blocking=True) if self.is_cuda else t

    def _host_empty(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self.is_cuda)

    def _write_back(self, keys: Tensor, values: Tensor, scores: Tensor, *, wait: bool = True) -> None:
        """Rows leaving the cache (or copied out by flush) overwrite the host table's, with the cache's scores;
        ``wait=False`` leaves the host table's part to the writer thread (the next host access waits for it)."""
        if not keys.numel():
            return
        host = self.host
        rows = self._to_host_all(keys, values, scores.view(torch.int64))  # in host memory before the call returns
        if wait:
            host.restore(*rows)
        else:
            self._pending = self._writer.submit(host.restore, *rows)

    def _uncache(self, keys: Tensor) -> None:
        """Writes the cached rows of ``keys`` back and drops them from the cache: the host table is then the one
        copy of each (before an operation that acts on the host table alone)."""
        values, found, scores = self.cache.find_with_scores(keys)
        at = found.nonzero().squeeze(1)
        if at.numel():
            self._write_back(keys[at], values[at], scores[at])
            self.cache.erase(keys[at])

    def _drop_orphans(self) -> None:
        """After the host table evicted keys: drops those keys from the cache too (one pass over the cache), so that
        every cached key has a host slot and a write-back never has to evict."""
        keys = self.cache.export()[0]
        _, in_host = self.host.find(self._to_host(keys))
        gone = (~in_host).nonzero().squeeze(1)
        if gone.numel():
            self.cache.erase(keys[self._to_device(gone)])

    def _host_inserted(self, status: Tensor) -> Tensor:
        """The statuses of an inserting host operation, on the device, after dropping what it evicted."""
        if bool((status == EVICTED).any()):
            self._drop_orphans()
        return self._to_device(status)

    def flush(self) -> int:
        """Writes every cached row (embedding, optimizer state, score) back to the host table, which then holds the
        whole table; the cache keeps its rows. Returns the number of rows written."""
        keys, values, scores = self.cache.export()
        self._write_back(keys, values, scores)
        return int(keys.numel())

    # ------------------------------------------------------------------ lookups and updates
    def find_or_insert(self, keys: Tensor, scores: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(values [n, value_dim], status int8 [n])`` as ``DynamicHashTable.find_or_insert``: hits from the cache,
        misses from the host table (new keys inserted there) and then loaded into the cache."""
        if scores is not None:
            raise ValueError(f"scores are only given with policy='custom' (this table: {self.config.policy!r})")
        keys = self.cache._keys(keys)
        values, found = self.cache.find(keys, touch=True)
        miss = (~found).nonzero().squeeze(1)
        status = torch.full((keys.numel(),), FOUND, dtype=torch.int8, device=self.device)
        self.hits += keys.numel() - miss.numel()
        self.misses += miss.numel()
        bad = None
        if miss.numel():
            miss_keys = keys[miss]
            host_keys = self._to_host(miss_keys)
            reserved = host_keys <= ERASED_KEY  # the two reserved keys are the smallest int64 values
            if bool(reserved.any()):
                bad = int(host_keys[reserved][0])
            rows, host_status, host_scores = self._load(host_keys, reserved)
            status[miss] = self._host_inserted(host_status)  # (drops from the cache what a full host table evicted)
            miss_rows = self._to_device(rows)
            values[miss] = miss_rows
            # Keys with a host slot enter the cache (rejected and reserved keys have none).
            cacheable = (host_status != REJECTED).nonzero().squeeze(1)
            if cacheable.numel():
                at = self._to_device(cacheable)
                cache_scores = None if host_scores is None else self._to_device(host_scores[cacheable])
                _, ev_keys, ev_values, ev_scores = self.cache.insert_or_assign_evicting(
                    miss_keys[at], miss_rows[at], cache_scores
                )
                self.write_backs += ev_keys.numel()
                self._write_back(ev_keys, ev_values, ev_scores, wait=False)
        if bad is not None:
            raise ValueError(
                f"key {bad} is reserved by the table (reserved keys: {list(RESERVED_KEYS)}); it was not stored, the "
                "batch's other keys were processed"
            )
        return values, status

    def _load(self, host_keys: Tensor, reserved: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """The host table's ``find_or_insert`` of the cache's misses, into (pinned) host buffers: rows, statuses
        and, for LFU policies, the keys' scores after the touch. Reserved keys get the initializer's row and
        REJECTED (what a single table gives them), without reaching the host table."""
        m = host_keys.numel()
        rows = self._host_empty(m, self.value_dim)
        status = self._host_empty(m, dtype=torch.int8)
        ok = (~reserved).nonzero().squeeze(1)
        looked_up = host_keys if ok.numel() == m else host_keys[ok].contiguous()
        out_rows = rows if ok.numel() == m else torch.empty(ok.numel(), self.value_dim)
        out_status = status if ok.numel() == m else torch.empty(ok.numel(), dtype=torch.int8)
        if ok.numel():
            self.host._table.find_or_insert(
                looked_up.data_ptr(), ok.numel(), out_rows.data_ptr(), out_status.data_ptr(), 0
            )
        scores = None
        if self.config.policy in _SCORE_READING_POLICIES:
            _, _, got = self.host.find_with_scores(looked_up)
            scores = torch.zeros(m, dtype=torch.int64)
            scores[ok] = got.view(torch.int64)
        if ok.numel() != m:
            rows[ok] = out_rows
            status[ok] = out_status
            bad = reserved.nonzero().squeeze(1)
            rows[bad] = self.host.initial_rows(host_keys[bad])
            status[bad] = REJECTED
        return rows, status, scores

    def find_or_insert_embeddings(
        self, keys: Tensor, out: Tensor, status: Tensor, *, keys_checked: bool = False
    ) -> None:
        """``find_or_insert`` writing the embeddings into ``out [n, dim]`` and the statuses into ``status [n]``."""
        values, st = self.find_or_insert(keys)
        out.copy_(values[:, : self.dim])
        status.copy_(st)

    def find(self, keys: Tensor, *, touch: bool = False) -> tuple[Tensor, Tensor]:
        """``(values [n, value_dim], found bool [n])`` from the cache, then the host table; loads nothing."""
        keys = self.cache._keys(keys)
        values, found = self.cache.find(keys, touch=touch)
        miss = (~found).nonzero().squeeze(1)
        if miss.numel():
            host_values, host_found = self.host.find(self._to_host(keys[miss]), touch=touch)
            values[miss] = self._to_device(host_values)
            found[miss] = self._to_device(host_found)
        return values, found

    def apply_optimizer(
        self,
        keys: Tensor,
        grads: Tensor,
        kind: str,
        *,
        lr: float,
        eps: float = 1e-8,
        beta1: float = 0.9,
        beta2: float = 0.999,
        step: int = 1,
        distinct: bool = False,
    ) -> Tensor:
        """``DynamicHashTable.apply_optimizer``: cached rows are updated in the cache, the others in the host
        table. Returns ``found``."""
        opt = dict(lr=lr, eps=eps, beta1=beta1, beta2=beta2, step=step, distinct=distinct)
        found = self.cache.apply_optimizer(keys, grads, kind, **opt)
        miss = (~found).nonzero().squeeze(1)
        if miss.numel():
            host_keys, host_grads = self._to_host_all(
                self.cache._keys(keys)[miss], grads.detach().reshape(-1, self.dim)[miss]
            )
            found[miss] = self._to_device(self.host.apply_optimizer(host_keys, host_grads, kind, **opt))
        return found

    def insert_or_assign(self, keys: Tensor, values: Tensor, scores: Tensor | None = None) -> Tensor:
        keys = self.cache._keys(keys)
        self._uncache(keys)
        return self._host_inserted(self.host.insert_or_assign(self._to_host(keys), self._to_host(values), scores))

    def assign(self, keys: Tensor, values: Tensor) -> Tensor:
        keys = self.cache._keys(keys)
        self._uncache(keys)
        return self._to_device(self.host.assign(self._to_host(keys), self._to_host(values)))

    def accumulate(self, keys: Tensor, delta: Tensor) -> Tensor:
        keys = self.cache._keys(keys)
        self._uncache(keys)
        return self._to_device(self.host.accumulate(self._to_host(keys), self._to_host(delta)))

    def restore(self, keys: Tensor, values: Tensor, scores: Tensor) -> Tensor:
        """Rows with their saved scores into the host table (cached copies of these keys are dropped)."""
        self.cache.erase(keys.reshape(-1).to(self.device))
        return self._host_inserted(self.host.restore(keys, values, scores))

    def erase(self, keys: Tensor) -> int:
        keys = self.cache._keys(keys)
        self.cache.erase(keys)
        return self.host.erase(self._to_host(keys))

    def erase_if(self, score_below: int) -> int:
        self.flush()
        self.cache.clear()
        return self.host.erase_if(score_below)

    def export(self, score_at_least: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """The whole table's rows with score >= ``score_at_least`` (after ``flush``), on ``device``."""
        keys, values, scores = self.export_to_host(score_at_least)
        if not self.is_cuda:
            return keys, values, scores
        return keys.to(self.device), values.to(self.device), scores.view(torch.int64).to(self.device).view(torch.uint64)

    def export_to_host(self, score_at_least: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        self.flush()
        return self.host.export(score_at_least)

    def initial_rows(self, keys: Tensor) -> Tensor:
        return self.cache.initial_rows(keys)

    # ------------------------------------------------------------------ bookkeeping
    def size(self) -> int:
        return self.host.size()

    def capacity(self) -> int:
        return self.host.capacity()

    def load_factor(self) -> float:
        return self.host.load_factor()

    def hbm_rows(self) -> int:
        """Rows the cache holds on ``device`` (all of them in HBM on a GPU)."""
        return self.cache.capacity()

    def reserve(self, capacity: int) -> None:
        self.host.reserve(capacity)

    def clear(self) -> None:
        self.cache.clear()
        self.host.clear()

    def set_step(self, step: int) -> None:
        self.host.set_step(step)
        self.cache.set_step(step)
        self.step = int(step)

    def set_epoch(self, epoch: int) -> None:
        self.host.set_epoch(epoch)
        self.cache.set_epoch(epoch)
        self.epoch = int(epoch)

    @property
    def evicted_count(self) -> int:
        """Keys the table (its host table) evicted; the cache's evictions are ``write_backs``."""
        return self.host.evicted_count

    @property
    def rejected_count(self) -> int:
        return self.host.rejected_count

    def __len__(self) -> int:
        return self.size()
