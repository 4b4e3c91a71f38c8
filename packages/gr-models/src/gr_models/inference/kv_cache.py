"""Paged per-user K/V cache of HSTU layers, with LRU eviction under a byte budget and model-version stamps.

Memory: one pool per cache (one device, one dtype), preallocated at construction: ``k_pool[L, S, H, Dqk]`` and
``v_pool[L, S, H, Dv]`` with ``S = num_pages * page_size`` token slots. A page is ``page_size`` consecutive slots
in every layer's plane; a user's entry holds a page table (list of page ids), and token ``t`` of the user lives in
slot ``pages[t // page_size] * page_size + t % page_size``. Pages are recycled through a free list, so a long-running
server never allocates after start-up and fragmentation cannot grow (any free page serves any user).

Entries are evicted least-recently-used first when a reservation needs more pages than are free. An entry carries the
``model_version`` it was computed with; looking it up with another version drops it (counted as an invalidation), so
a model update can never serve stale K/V. ``meta`` is opaque to the cache: the scorer keeps what it needs to extend
the entry (e.g. the query time the last token was computed for).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gr_models.transfer import to_device


def _flat_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Indices into ``t.view(L * S, ...)`` of ``rows`` of every plane of ``t [L, S, ...]``, plane after plane."""
    num_planes, plane = t.shape[0], t.shape[1]
    return (torch.arange(num_planes, device=rows.device).view(-1, 1) * plane + rows.view(1, -1)).view(-1)


def select_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``t.index_select(1, rows)`` for a contiguous ``t [L, S, ...]``, as one gather along a flattened first dim:
    torch sends ``index_select`` on a later dim with more than 16 indices to an element-wise gather that reads an
    int64 index per element (5x the bytes of bf16 K/V); along dim 0 each row takes one index and vector loads."""
    num_planes, n = t.shape[0], rows.numel()
    return t.view(-1, *t.shape[2:]).index_select(0, _flat_rows(t, rows)).view(num_planes, n, *t.shape[2:])


def copy_rows_(t: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``t.index_copy_(1, rows, src)`` for a contiguous ``t [L, S, ...]`` through its flattened first dim."""
    flat_src = src.reshape(-1, *t.shape[2:])
    t.view(-1, *t.shape[2:]).index_copy_(0, _flat_rows(t, rows), flat_src)
    return t


class CacheCapacityError(RuntimeError):
    """A single entry needs more pages than the whole pool holds."""


@dataclass
class CacheEntry:
    """One user's cached tokens: rows ``[0, num_tokens)`` of the user's K/V live in ``pages``."""

    user_id: Hashable
    model_version: str
    pages: list[int] = field(default_factory=list)
    num_tokens: int = 0
    meta: Any = None
    # The pool slot of every row ``pages`` hold (``KVCache.slots`` builds it once; whatever changes ``pages`` drops it).
    slot_rows: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    invalidations: int
    entries: int
    pages_used: int
    pages_total: int
    page_bytes: int
    bytes_used: int  # pages held by entries
    bytes_capacity: int  # the preallocated pool
    tokens: int  # cached tokens over all entries

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


class KVCache:
    """Per-user, per-layer K/V in a preallocated paged pool (see the module docstring).

    Args:
        num_layers, num_heads, qk_dim, v_dim: the HSTU encoder's shape (``for_encoder`` reads them off a config).
        budget_bytes: bytes the K and V pools may take together; ``budget_bytes // page_bytes`` pages are allocated.
        page_size: tokens per page.
        device, dtype: where and in which dtype K/V are kept (the scorer's compute dtype).
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_heads: int,
        qk_dim: int,
        v_dim: int,
        budget_bytes: int,
        page_size: int = 64,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        for name, value in (
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("qk_dim", qk_dim),
            ("v_dim", v_dim),
            ("page_size", page_size),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCache {name} must be an int >= 1, got {value!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"KVCache dtype must be a floating point dtype, got {dtype}")
        itemsize = torch.empty(0, dtype=dtype).element_size()
        self.page_bytes = num_layers * page_size * num_heads * (qk_dim + v_dim) * itemsize
        num_pages = int(budget_bytes) // self.page_bytes
        if num_pages < 1:
            raise ValueError(
                f"KVCache budget_bytes={budget_bytes} is below one page ({self.page_bytes} bytes = {num_layers} layers "
                f"x {page_size} tokens x {num_heads} heads x ({qk_dim} + {v_dim}) dims x {itemsize} bytes)"
            )
        self.num_layers, self.num_heads, self.qk_dim, self.v_dim = num_layers, num_heads, qk_dim, v_dim
        self.page_size = page_size
        self.num_pages = num_pages
        self.device = torch.device(device)
        self.dtype = dtype
        slots = num_pages * page_size
        self.k_pool = torch.zeros(num_layers, slots, num_heads, qk_dim, device=self.device, dtype=dtype)
        self.v_pool = torch.zeros(num_layers, slots, num_heads, v_dim, device=self.device, dtype=dtype)
        # A stack: the most recently freed page is reused first (keeps the working set of pages small).
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._entries: OrderedDict[Hashable, CacheEntry] = OrderedDict()  # least recently used first
        self._hits = self._misses = self._evictions = self._invalidations = 0

    @classmethod
    def for_encoder(
        cls,
        hstu_config: Any,
        *,
        budget_bytes: int,
        page_size: int = 64,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        """A cache shaped for an ``HSTUConfig`` (``num_blocks`` layers, ``num_heads``, ``qk_dim``, ``v_dim``)."""
        return cls(
            num_layers=hstu_config.num_blocks,
            num_heads=hstu_config.num_heads,
            qk_dim=hstu_config.qk_dim,
            v_dim=hstu_config.v_dim,
            budget_bytes=budget_bytes,
            page_size=page_size,
            device=device,
            dtype=dtype,
        )

    # -- entries -------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, user_id: Hashable) -> bool:
        return user_id in self._entries

    def users(self) -> list[Hashable]:
        """Cached users, least recently used first."""
        return list(self._entries)

    def lookup(self, user_id: Hashable, model_version: str) -> CacheEntry | None:
        """The user's entry (now the most recently used), or None on a miss. An entry of another model version is
        dropped and counted as an invalidation (and a miss)."""
        entry = self._entries.get(user_id)
        if entry is not None and entry.model_version != model_version:
            self._drop(user_id)
            self._invalidations += 1
            entry = None
        if entry is None:
            self._misses += 1
            return None
        self._entries.move_to_end(user_id)
        self._hits += 1
        return entry

    def reserve(self, user_id: Hashable, model_version: str, num_tokens: int) -> CacheEntry:
        """Make the user's entry (created if absent, re-stamped with ``model_version``) hold exactly enough pages for
        ``num_tokens`` tokens, evicting least recently used entries of other users when pages run out. Rows already
        written below ``num_tokens`` are kept; ``entry.num_tokens`` is set to ``num_tokens``.

        Raises CacheCapacityError (evicting nothing) when ``num_tokens`` needs more pages than the whole pool.
        """
        if not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        need = -(-num_tokens // self.page_size)
        if need > self.num_pages:
            raise CacheCapacityError(
                f"user {user_id!r} needs {num_tokens} tokens = {need} pages of {self.page_size}, but the cache holds "
                f"{self.num_pages} pages ({self.num_pages * self.page_bytes} bytes); raise budget_bytes"
            )
        entry = self._entries.get(user_id)
        if entry is None:
            entry = self._entries[user_id] = CacheEntry(user_id, model_version)
        entry.model_version = model_version
        self._entries.move_to_end(user_id)
        if len(entry.pages) != need:
            entry.slot_rows = None
        while len(entry.pages) > need:
            self._free.append(entry.pages.pop())
        while len(entry.pages) < need:
            while not self._free:  # an evicted entry may hold no pages (0 tokens)
                self._evict_lru(keep=user_id)
            entry.pages.append(self._free.pop())
        entry.num_tokens = num_tokens
        return entry

    def invalidate(self, user_id: Hashable) -> bool:
        """Drop the user's entry; True if there was one."""
        if user_id not in self._entries:
            return False
        self._drop(user_id)
        self._invalidations += 1
        return True

    def invalidate_other_versions(self, model_version: str) -> int:
        """Drop every entry not computed with ``model_version`` (e.g. after loading a new checkpoint); returns how
        many were dropped."""
        stale = [u for u, e in self._entries.items() if e.model_version != model_version]
        for user_id in stale:
            self._drop(user_id)
        self._invalidations += len(stale)
        return len(stale)

    def clear(self) -> None:
        for user_id in list(self._entries):
            self._drop(user_id)

    def _drop(self, user_id: Hashable) -> None:
        entry = self._entries.pop(user_id)
        self._free.extend(reversed(entry.pages))
        entry.pages = []
        entry.slot_rows = None
        entry.num_tokens = 0

    def _evict_lru(self, keep: Hashable) -> None:
        for user_id in self._entries:
            if user_id != keep:
                self._drop(user_id)
                self._evictions += 1
                return
        raise AssertionError("no entry to evict although the pool is short of pages")  # reserve checked the size

    # -- K/V rows ------------------------------------------------------------------------------------------------

    def _entry(self, user_id: Hashable) -> CacheEntry:
        entry = self._entries.get(user_id)
        if entry is None:
            raise KeyError(f"user {user_id!r} has no cache entry (reserve it first)")
        return entry

    def slots(self, user_id: Hashable, start: int, end: int) -> torch.Tensor:
        """Pool slots of the user's rows ``[start, end)``: a CPU int64 tensor (built on the host, so a caller can
        ship it to the device with its other indices in one copy). A view of the entry's slot table, kept until its
        pages change (every request of a cached user needs it): read it, do not write it."""
        entry = self._entry(user_id)
        if not 0 <= start <= end <= entry.num_tokens:
            raise IndexError(f"rows [{start}, {end}) outside user {entry.user_id!r}'s {entry.num_tokens} cached tokens")
        if entry.slot_rows is None:
            pages = np.array(entry.pages, dtype=np.int64)
            slots = pages.reshape(-1, 1) * self.page_size + np.arange(self.page_size, dtype=np.int64)
            entry.slot_rows = slots.reshape(-1)
        return torch.from_numpy(entry.slot_rows[start:end])

    def _slots(self, entry: CacheEntry, start: int, end: int) -> torch.Tensor:
        return to_device(self.slots(entry.user_id, start, end), self.device)

    def write(self, user_id: Hashable, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k [n, H, Dqk]`` and ``v [n, H, Dv]`` as rows ``[start, start + n)`` of ``layer`` (cast to the
        cache dtype)."""
        entry = self._entry(user_id)
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} outside [0, {self.num_layers})")
        n = k.shape[0]
        want_k, want_v = (n, self.num_heads, self.qk_dim), (n, self.num_heads, self.v_dim)
        if tuple(k.shape) != want_k or tuple(v.shape) != want_v:
            raise ValueError(f"k/v must be {want_k}/{want_v}, got {tuple(k.shape)}/{tuple(v.shape)}")
        slots = self._slots(entry, start, start + n)
        self.k_pool[layer].index_copy_(0, slots, k.to(device=self.device, dtype=self.dtype))
        self.v_pool[layer].index_copy_(0, slots, v.to(device=self.device, dtype=self.dtype))

    def read(self, user_id: Hashable, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``[0, end)`` (default: all cached tokens) of every layer: ``k [L, n, H, Dqk]``, ``v [L, n, H, Dv]``
        (fresh tensors, not views of the pool)."""
        entry = self._entry(user_id)
        slots = self._slots(entry, 0, entry.num_tokens if end is None else end)
        return select_rows(self.k_pool, slots), select_rows(self.v_pool, slots)

    def write_rows(self, user_id: Hashable, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """``write`` for every layer at once: ``k [L, n, H, Dqk]``, ``v [L, n, H, Dv]`` become rows ``[start, start +
        n)`` (one copy per pool instead of one per layer)."""
        entry = self._entry(user_id)
        n = k.shape[1] if k.dim() == 4 else -1
        want_k = (self.num_layers, n, self.num_heads, self.qk_dim)
        want_v = (self.num_layers, n, self.num_heads, self.v_dim)
        if tuple(k.shape) != want_k or tuple(v.shape) != want_v:
            raise ValueError(f"k/v must be {want_k}/{want_v}, got {tuple(k.shape)}/{tuple(v.shape)}")
        # ``copy_rows_`` with the flat indices built on the host (both pools share them): one copy to the device
        # and one kernel per pool, where a request would otherwise launch three more per pool to build them.
        slots = self.slots(entry.user_id, start, start + n).numpy()
        plane = self.k_pool.shape[1]
        flat = (np.arange(self.num_layers, dtype=np.int64).reshape(-1, 1) * plane + slots.reshape(1, -1)).reshape(-1)
        flat = to_device(torch.from_numpy(flat), self.device)
        for pool, rows in ((self.k_pool, k), (self.v_pool, v)):
            rows = rows.to(device=self.device, dtype=self.dtype).reshape(-1, *pool.shape[2:])
            pool.view(-1, *pool.shape[2:]).index_copy_(0, flat, rows)

    # -- accounting ----------------------------------------------------------------------------------------------

    def stats(self) -> CacheStats:
        used = self.num_pages - len(self._free)
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
            invalidations=self._invalidations,
            entries=len(self._entries),
            pages_used=used,
            pages_total=self.num_pages,
            page_bytes=self.page_bytes,
            bytes_used=used * self.page_bytes,
            bytes_capacity=self.num_pages * self.page_bytes,
            tokens=sum(e.num_tokens for e in self._entries.values()),
        )
