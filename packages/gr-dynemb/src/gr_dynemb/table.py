"""``DynamicHashTable``: the Python face of the native collision-free int64 -> row hash tables (CPU and CUDA).

Keys are any int64 except the two reserved sentinels (``RESERVED_KEYS``). No slot can hold one: lookups (``find``,
``assign``, ``accumulate``, ``erase``) report them absent, and inserting operations leave them out (status REJECTED),
process the rest of the batch and then raise a ValueError naming the key. The native tables do that check in the
same pass over the keys, so no operation scans its keys on the host first. A value row is ``[embedding (dim) |
optimizer state]``. New keys get their embedding from a seeded, per-key initializer (the same key gets the same
initial row whatever the batch order or thread count) and zero optimizer state.

When a key's bucket (128 slots) is full, the slot with the lowest score is replaced if the newcomer scores higher;
otherwise the newcomer is *rejected*: it gets no slot, ``find_or_insert`` returns the initializer's row for it, and
``rejected_count`` grows. With ``policy="none"`` nothing is ever evicted and a rejected insert raises
``TableFullError``. Scores per policy: ``lru`` the step set by ``set_step``; ``lfu`` the number of touches;
``epoch_lru``/``epoch_lfu`` ``epoch << 32 | step`` / ``epoch << 32 | touches this epoch``; ``custom`` the caller's.

``device="cuda"`` puts the table on a GPU (same hashing, buckets, probe order, scores and initializer rows as the
CPU table); tensors then go in and come out on that device. ``hbm_budget_bytes`` keeps only that many bytes of value
rows in HBM and the rest in pinned host memory that the kernels read through UVA (keys, scores and digests stay in
HBM). Differences from the CPU table: when one batch holds a key several times, one of the copies (not necessarily
the first) reports INSERTED and the others FOUND; ``export`` is in slot order on both, but slots depend on the order
of concurrent inserts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

try:
    from gr_dynemb import _C
except ImportError as exc:  # imported from a source tree that was never built (or a stale editable install)
    raise ImportError(
        "gr_dynemb's native extension (gr_dynemb._C) is not built in this environment; install the package "
        "so that it compiles: `pip install packages/gr-dynemb` (or `-e` for a checkout); in a hatch workspace "
        "`hatch env prune` and run again"
    ) from exc

EMPTY_KEY: int = _C.EMPTY_KEY
ERASED_KEY: int = _C.ERASED_KEY
RESERVED_KEYS = (EMPTY_KEY, ERASED_KEY)
BUCKET_SIZE: int = _C.BUCKET_SIZE

ScorePolicy = Literal["none", "lru", "lfu", "epoch_lru", "epoch_lfu", "custom"]
_POLICIES = {"none": 0, "lru": 1, "lfu": 2, "epoch_lru": 3, "epoch_lfu": 4, "custom": 5}
_INITS = {"normal": 0, "truncated_normal": 1, "uniform": 2, "constant": 3}
_OPTIMIZERS = {"sgd": 0, "adagrad": 1, "rowwise_adagrad": 2, "adam": 3}

# Policies a caching table can evict by (``none`` never evicts; ``custom`` needs the caller's scores on every op).
CACHE_POLICIES = ("lru", "lfu", "epoch_lru", "epoch_lfu")

# Per-key results of the inserting operations (``status`` tensors, int8).
FOUND, INSERTED, EVICTED, REJECTED = 0, 1, 2, 3


class TableFullError(RuntimeError):
    """A key found its bucket full in a table that never evicts (``policy="none"``)."""


@dataclass
class InitializerConfig:
    """How a new key's embedding is drawn: ``normal``/``truncated_normal`` (mean, std; truncation at 2 std),
    ``uniform`` (low, high) or ``constant`` (value)."""

    kind: Literal["normal", "truncated_normal", "uniform", "constant"] = "truncated_normal"
    mean: float = 0.0
    std: float = 0.02
    low: float = -0.05
    high: float = 0.05
    value: float = 0.0
    seed: int = 0

    def native(self) -> tuple[int, float, float, int]:
        if self.kind not in _INITS:
            raise ValueError(f"initializer kind must be one of {sorted(_INITS)}, got {self.kind!r}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"initializer seed must be in [0, 2^64), got {self.seed}")
        if self.kind in ("normal", "truncated_normal"):
            if self.std <= 0:
                raise ValueError(f"initializer std must be > 0, got {self.std}")
            return _INITS[self.kind], self.mean, self.std, self.seed
        if self.kind == "uniform":
            if not self.low < self.high:
                raise ValueError(f"uniform initializer needs low < high, got [{self.low}, {self.high}]")
            return _INITS[self.kind], self.low, self.high, self.seed
        return _INITS[self.kind], self.value, 0.0, self.seed


@dataclass
class DynamicTableConfig:
    """Shape and policies of one dynamic table. ``capacity`` grows by doubling up to ``max_capacity`` whenever an
    insert would pass ``max_load_factor``; both are rounded up to whole buckets of 128 slots."""

    dim: int
    capacity: int = 1 << 16
    max_capacity: int = 1 << 24
    policy: ScorePolicy = "lru"
    initializer: InitializerConfig = field(default_factory=InitializerConfig)
    max_load_factor: float = 0.75
    num_threads: int = 0  # 0: all cores (CPU table)
    device: str = "cpu"  # "cpu" or "cuda" / "cuda:<i>": where keys, scores and rows live, and where tensors go
    hbm_budget_bytes: int | None = None  # CUDA: bytes of value rows kept in HBM (the rest in pinned host memory)
    # Caching storage (gr_dynemb.caching): every row lives in a host-memory table and a table of this many slots on
    # ``device`` caches the recently used ones; None: one table on ``device``.
    cache_capacity: int | None = None

    def __post_init__(self) -> None:
        if self.dim <= 0:
            raise ValueError(f"dim must be positive, got {self.dim}")
        if self.capacity <= 0 or self.max_capacity < self.capacity:
            raise ValueError(f"need 0 < capacity <= max_capacity, got {self.capacity}, {self.max_capacity}")
        if self.policy not in _POLICIES:
            raise ValueError(f"policy must be one of {sorted(_POLICIES)}, got {self.policy!r}")
        if not 0.0 < self.max_load_factor <= 1.0:
            raise ValueError(f"max_load_factor must be in (0, 1], got {self.max_load_factor}")
        kind = torch.device(self.device).type
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:index]', got {self.device!r}")
        if self.hbm_budget_bytes is not None:
            if kind != "cuda":
                raise ValueError("hbm_budget_bytes is for CUDA tables (device='cuda'); a CPU table is all host memory")
            if self.hbm_budget_bytes < 0:
                raise ValueError(f"hbm_budget_bytes must be >= 0, got {self.hbm_budget_bytes}")
        if self.cache_capacity is not None:
            if self.cache_capacity <= 0:
                raise ValueError(f"cache_capacity must be positive, got {self.cache_capacity}")
            if self.cache_capacity > self.max_capacity:
                raise ValueError(
                    f"cache_capacity ({self.cache_capacity}) must not exceed max_capacity ({self.max_capacity}): the "
                    "cache holds a part of the table"
                )
            if self.policy not in CACHE_POLICIES:
                raise ValueError(
                    f"caching storage (cache_capacity) needs a score policy the cache can evict by, one of "
                    f"{list(CACHE_POLICIES)}; got policy={self.policy!r}"
                )
            if self.hbm_budget_bytes is not None:
                raise ValueError(
                    "cache_capacity (caching storage) and hbm_budget_bytes (hybrid storage) are two ways to keep only "
                    "some rows in HBM; set one of them"
                )

    @property
    def storage(self) -> Literal["host", "hbm", "hybrid", "caching"]:
        """Where the rows live: ``host`` (CPU table), ``hbm`` (CUDA table), ``hybrid`` (CUDA table with value rows
        beyond ``hbm_budget_bytes`` in pinned host memory) or ``caching`` (host table + cache on ``device``)."""
        if self.cache_capacity is not None:
            return "caching"
        if torch.device(self.device).type == "cpu":
            return "host"
        return "hbm" if self.hbm_budget_bytes is None else "hybrid"


class DynamicHashTable:
    """Collision-free int64-keyed rows in host memory (CPU table) or on a GPU (CUDA table, ``device="cuda"``);
    every method takes and returns tensors on the table's ``device``."""

    def __init__(
        self, config: DynamicTableConfig, state_dim: int = 0, device: str | torch.device | None = None
    ) -> None:
        if state_dim < 0:
            raise ValueError(f"state_dim must be >= 0, got {state_dim}")
        self.config = config
        self.dim = config.dim
        self.value_dim = config.dim + state_dim
        self.step = 0  # the clocks scores read (see set_step / set_epoch)
        self.epoch = 0
        self.device = _table_device(config.device if device is None else device)
        if config.hbm_budget_bytes is not None and self.device.type != "cuda":
            raise ValueError("hbm_budget_bytes is for CUDA tables; this table is on the CPU")
        if config.cache_capacity is not None:
            raise ValueError(
                "this config asks for caching storage (cache_capacity): build it with gr_dynemb.make_table (a "
                "CachingHashTable), not DynamicHashTable"
            )
        kind, a, b, seed = config.initializer.native()
        common = dict(
            capacity=config.capacity,
            max_capacity=config.max_capacity,
            dim=config.dim,
            value_dim=self.value_dim,
            policy=_POLICIES[config.policy],
            init_kind=kind,
            init_a=a,
            init_b=b,
            seed=seed,
            max_load_factor=config.max_load_factor,
        )
        if self.device.type == "cuda":
            budget = -1 if config.hbm_budget_bytes is None else config.hbm_budget_bytes
            self._table = _C.CudaTable(**common, hbm_budget_bytes=budget, device=self.device.index)
        else:
            self._table = _C.CpuTable(**common, num_threads=config.num_threads)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def _stream(self) -> tuple[int, ...]:
        """The trailing stream argument of the CUDA table's methods (none for the CPU table)."""
        return (torch.cuda.current_stream(self.device).cuda_stream,) if self.is_cuda else ()

    # ------------------------------------------------------------------ checks
    def _keys(self, keys: Tensor) -> Tensor:
        """Flat contiguous int64 keys on the table's device (reserved sentinels are the native tables' to catch)."""
        if not isinstance(keys, Tensor):
            raise TypeError(f"keys must be a torch.Tensor, got {type(keys).__name__}")
        if keys.dtype != torch.int64:
            raise TypeError(f"keys must be int64, got {keys.dtype}")
        if keys.device != self.device:
            where = "in host memory" if self.device.type == "cpu" else f"on {self.device}"
            raise ValueError(f"this table lives {where}; keys are on {keys.device}")
        return keys.reshape(-1).contiguous()

    def _raise_if_reserved(self, keys: Tensor) -> None:
        """After an inserting op: the native table counted the reserved keys it was offered (and stored none)."""
        if self._table.take_reserved_count(*self._stream()):
            bad = int(keys[(keys == RESERVED_KEYS[0]) | (keys == RESERVED_KEYS[1])][0])
            raise ValueError(
                f"key {bad} is reserved by the table (reserved keys: {list(RESERVED_KEYS)}); it was not stored, the "
                "batch's other keys were processed"
            )

    def _values(self, values: Tensor, n: int) -> Tensor:
        if not isinstance(values, Tensor) or values.dtype != torch.float32:
            raise TypeError(f"values must be a float32 tensor, got {getattr(values, 'dtype', type(values).__name__)}")
        if values.shape != (n, self.value_dim):
            raise ValueError(f"values must be [{n}, {self.value_dim}], got {tuple(values.shape)}")
        return values.detach().to(self.device).contiguous()

    def _scores(self, scores: Tensor | None, n: int) -> Tensor | None:
        if self.config.policy != "custom":
            if scores is not None:
                raise ValueError(f"scores are only given with policy='custom' (this table: {self.config.policy!r})")
            return None
        if scores is None:
            raise ValueError("policy='custom' needs a score for every key")
        if scores.dtype not in (torch.int64, torch.uint64) or scores.shape != (n,):
            raise ValueError(f"scores must be int64 [{n}], got {scores.dtype} {tuple(scores.shape)}")
        if scores.dtype == torch.int64 and bool((scores < 0).any()):
            raise ValueError("custom scores must be >= 0")
        return _as_u64_bits(scores, self.device)

    def _saved_scores(self, scores: Tensor, n: int) -> Tensor:
        """Scores carried with rows (checkpoints, write-backs), taken for any policy: int64/uint64 ``[n]`` as uint64
        bits on the table's device."""
        if scores.shape != (n,) or scores.dtype not in (torch.int64, torch.uint64):
            raise ValueError(f"scores must be int64/uint64 [{n}], got {scores.dtype} {tuple(scores.shape)}")
        return _as_u64_bits(scores, self.device)

    def _raise_if_full(self, status: Tensor, keys: Tensor) -> None:
        if self.config.policy == "none" and bool((status == REJECTED).any()):
            key = int(keys[status == REJECTED][0])
            raise TableFullError(
                f"key {key}: its bucket is full and policy='none' never evicts (size {self.size()}, capacity "
                f"{self.capacity()}, max_capacity {self.config.max_capacity}); raise max_capacity or pick an eviction "
                "policy"
            )

    # ------------------------------------------------------------------ operations
    def find(self, keys: Tensor, *, touch: bool = False) -> tuple[Tensor, Tensor]:
        """``(values [n, value_dim], found bool [n])``; rows of missing keys are zero. ``touch`` updates scores."""
        keys = self._keys(keys)
        values = torch.empty(keys.numel(), self.value_dim, device=self.device)  # missing keys' rows: zero-filled
        found = torch.empty(keys.numel(), dtype=torch.bool, device=self.device)
        self._find_into(keys, values, found, touch, None)
        return values, found

    def find_with_scores(self, keys: Tensor, *, touch: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """``find`` that also returns each key's score (uint64 ``[n]``; after the touch; 0 for missing keys)."""
        keys = self._keys(keys)
        values = torch.empty(keys.numel(), self.value_dim, device=self.device)
        found = torch.empty(keys.numel(), dtype=torch.bool, device=self.device)
        scores = torch.empty(keys.numel(), dtype=torch.int64, device=self.device)  # uint64 bits (viewed below)
        self._find_into(keys, values, found, touch, scores)
        return values, found, scores.view(torch.uint64)

    def _find_into(self, keys: Tensor, values: Tensor, found: Tensor, touch: bool, scores: Tensor | None) -> None:
        """The native find. With a host tier it runs in two halves around a sort of the keys' slots, so host rows
        are read in address order: the GPU's translation of mapped host pages misses on almost every random row of
        a multi-GiB tier (H200: 11 GB/s random vs 52 GB/s sorted at 4 GiB, ``docs/benchmarks/dynemb.md``)."""
        n, scores_ptr, stream = keys.numel(), 0 if scores is None else scores.data_ptr(), self._stream()
        if not self.is_cuda or self.hbm_rows() >= self.capacity():
            self._table.find(keys.data_ptr(), n, values.data_ptr(), found.data_ptr(), touch, scores_ptr, *stream)
            return
        slots = torch.empty(n, dtype=torch.int64, device=self.device)
        self._table.locate(keys.data_ptr(), n, slots.data_ptr(), found.data_ptr(), touch, scores_ptr, *stream)
        sorted_slots, order = torch.sort(slots)
        self._table.gather_rows(sorted_slots.data_ptr(), order.data_ptr(), n, values.data_ptr(), *stream)

    def find_or_insert(self, keys: Tensor, scores: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(values [n, value_dim], status int8 [n])``: present rows, new rows from the initializer, and the
        initializer's row (no slot) for rejected keys."""
        keys = self._keys(keys)
        scores = self._scores(scores, keys.numel())
        values = torch.empty(keys.numel(), self.value_dim, device=self.device)
        status = torch.empty(keys.numel(), dtype=torch.int8, device=self.device)
        self._table.find_or_insert(
            keys.data_ptr(),
            keys.numel(),
            values.data_ptr(),
            status.data_ptr(),
            0 if scores is None else scores.data_ptr(),
            *self._stream(),
        )
        self._raise_if_reserved(keys)
        self._raise_if_full(status, keys)
        return values, status

    def find_or_insert_embeddings(
        self, keys: Tensor, out: Tensor, status: Tensor, *, keys_checked: bool = False
    ) -> None:
        """``find_or_insert`` (policy scores) that writes only the embeddings, into ``out [n, dim]`` (float32) and the
        statuses into ``status [n]`` (int8): contiguous tensors on the table's device, e.g. slices of a batch-wide
        buffer. Raises like ``find_or_insert``, after the whole batch is processed. ``keys_checked``: the caller has
        made sure that no key is reserved, so the table's count of offered reserved keys is not read (on CUDA that
        read synchronises the stream)."""
        keys = self._keys(keys)
        n = keys.numel()
        _check_out(out, (n, self.dim), torch.float32, self.device, "out")
        _check_out(status, (n,), torch.int8, self.device, "status")
        self._table.find_or_insert_embeddings(keys.data_ptr(), n, out.data_ptr(), status.data_ptr(), 0, *self._stream())
        if not keys_checked:
            self._raise_if_reserved(keys)
        self._raise_if_full(status, keys)

    def insert_or_assign(self, keys: Tensor, values: Tensor, scores: Tensor | None = None) -> Tensor:
        """Writes rows (inserting absent keys); returns the status per key."""
        keys = self._keys(keys)
        values = self._values(values, keys.numel())
        scores = self._scores(scores, keys.numel())
        status = torch.empty(keys.numel(), dtype=torch.int8, device=self.device)
        self._table.insert_or_assign(
            keys.data_ptr(),
            keys.numel(),
            values.data_ptr(),
            status.data_ptr(),
            0 if scores is None else scores.data_ptr(),
            *self._stream(),
        )
        self._raise_if_reserved(keys)
        self._raise_if_full(status, keys)
        return status

    def insert_or_assign_evicting(
        self, keys: Tensor, values: Tensor, scores: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``insert_or_assign`` that hands out what it evicted: ``(status [n], evicted_keys [e], evicted_values
        [e, value_dim], evicted_scores [e] uint64)``, the keys that lost their slot to a key of this batch (status
        EVICTED), in batch order, with the rows and scores they had. This is a cache's write-back path, so
        ``scores`` (int64/uint64 ``[n]``, optional) are taken for any policy, as ``restore`` takes them; without
        them keys get their policy's score. Reads the evicted count (on CUDA: synchronises the stream)."""
        keys = self._keys(keys)
        n = keys.numel()
        values = self._values(values, n)
        if scores is not None:
            scores = self._saved_scores(scores, n)
        status = torch.empty(n, dtype=torch.int8, device=self.device)
        ev_keys = torch.empty(n, dtype=torch.int64, device=self.device)
        ev_values = torch.empty(n, self.value_dim, device=self.device)
        ev_scores = torch.empty(n, dtype=torch.int64, device=self.device)  # uint64 bits
        self._table.insert_or_assign_evicting(
            keys.data_ptr(), n, values.data_ptr(), status.data_ptr(), 0 if scores is None else scores.data_ptr(),
            ev_keys.data_ptr(), ev_values.data_ptr(), ev_scores.data_ptr(), *self._stream(),
        )  # fmt: skip
        self._raise_if_reserved(keys)
        self._raise_if_full(status, keys)
        at = (status == EVICTED).nonzero().squeeze(1)
        return status, ev_keys[at], ev_values[at], ev_scores[at].view(torch.uint64)

    def restore(self, keys: Tensor, values: Tensor, scores: Tensor) -> Tensor:
        """Inserts or overwrites rows together with their saved scores (any policy): the checkpoint-load path.
        Like every inserting operation it grows the table first as far as ``max_capacity`` allows. Tensors on any
        device are accepted (a checkpoint is read to the CPU)."""
        keys = self._keys(_check_int64(keys).to(self.device))
        values = self._values(values, keys.numel())
        scores = self._saved_scores(scores, keys.numel())
        status = torch.empty(keys.numel(), dtype=torch.int8, device=self.device)
        self._table.insert_or_assign(
            keys.data_ptr(), keys.numel(), values.data_ptr(), status.data_ptr(), scores.data_ptr(), *self._stream()
        )
        self._raise_if_reserved(keys)
        return status

    def assign(self, keys: Tensor, values: Tensor) -> Tensor:
        """Overwrites rows of present keys (absent keys are left absent); returns ``found``."""
        return self._update_present(self._table.assign, keys, values)

    def accumulate(self, keys: Tensor, delta: Tensor) -> Tensor:
        """Adds ``delta`` rows to present keys (duplicates add up); returns ``found``."""
        return self._update_present(self._table.accumulate, keys, delta)

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
        """One fused optimizer step (``sgd``, ``adagrad``, ``rowwise_adagrad``, ``adam``; formulas in
        ``gr_dynemb.embedding``) on the rows of present keys, in place, with gradients ``grads [n, dim]`` and Adam's
        step count ``step``. The optimizer state is the row's columns after the embedding. Returns ``found``;
        absent and reserved keys are skipped. Pass distinct keys (sum duplicate gradients first): duplicates are
        applied one after another under the bucket lock. ``distinct=True`` promises distinct keys (e.g. from
        ``torch.unique``): no bucket locks are taken, which a GPU needs no time for (duplicates would then race)."""
        if kind not in _OPTIMIZERS:
            raise ValueError(f"optimizer kind must be one of {sorted(_OPTIMIZERS)}, got {kind!r}")
        keys = self._keys(keys)
        if not isinstance(grads, Tensor) or grads.dtype != torch.float32 or grads.shape != (keys.numel(), self.dim):
            raise ValueError(
                f"grads must be float32 [{keys.numel()}, {self.dim}], got "
                f"{getattr(grads, 'dtype', type(grads).__name__)} {tuple(getattr(grads, 'shape', ()))}"
            )
        grads = grads.detach().to(self.device).contiguous()
        found = torch.empty(keys.numel(), dtype=torch.bool, device=self.device)
        self._table.apply_optimizer(
            keys.data_ptr(), keys.numel(), grads.data_ptr(), _OPTIMIZERS[kind], lr, eps, beta1, beta2, step,
            found.data_ptr(), distinct, *self._stream(),
        )  # fmt: skip
        return found

    def _update_present(self, native_op, keys: Tensor, rows: Tensor) -> Tensor:
        """Runs a native op that writes ``rows`` into the slots of present keys only; returns ``found``."""
        keys = self._keys(keys)
        rows = self._values(rows, keys.numel())
        found = torch.empty(keys.numel(), dtype=torch.bool, device=self.device)
        native_op(keys.data_ptr(), keys.numel(), rows.data_ptr(), found.data_ptr(), *self._stream())
        return found

    def erase(self, keys: Tensor) -> int:
        keys = self._keys(keys)
        return int(self._table.erase(keys.data_ptr(), keys.numel(), *self._stream()))

    def erase_if(self, score_below: int) -> int:
        """Erases every key whose score is below ``score_below``; returns how many."""
        return int(self._table.erase_if_score_below(_u64(score_below), *self._stream()))

    def export(self, score_at_least: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """``(keys, values, scores)`` of every key with score >= ``score_at_least`` (slot order), on the table's
        device (scores uint64)."""
        threshold = _u64(score_at_least)
        n = int(self._table.count_if_score_at_least(threshold, *self._stream()))
        keys = torch.empty(n, dtype=torch.int64, device=self.device)
        values = torch.empty(n, self.value_dim, device=self.device)
        scores = torch.empty(n, dtype=torch.int64, device=self.device)  # uint64 bits (viewed below)
        got = self._table.export_if_score_at_least(
            threshold, keys.data_ptr(), values.data_ptr(), scores.data_ptr(), n, *self._stream()
        )
        return keys[:got], values[:got], scores[:got].view(torch.uint64)

    def export_to_host(self, score_at_least: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """``export`` moved to host memory (checkpoints, state_dict): the CPU table's tensors as they are."""
        keys, values, scores = self.export(score_at_least)
        if not self.is_cuda:
            return keys, values, scores
        return keys.cpu(), values.cpu(), scores.view(torch.int64).cpu().view(torch.uint64)

    def initial_rows(self, keys: Tensor) -> Tensor:
        """What ``find_or_insert`` would give these keys if they were new: ``[n, value_dim]``."""
        keys = self._keys(keys)
        rows = torch.empty(keys.numel(), self.value_dim, device=self.device)
        if self.is_cuda:
            self._table.initial_rows(keys.data_ptr(), keys.numel(), rows.data_ptr(), *self._stream())
            return rows
        for i, key in enumerate(keys.tolist()):
            self._table.initial_row(key, rows[i].data_ptr())
        return rows

    # ------------------------------------------------------------------ bookkeeping
    def size(self) -> int:
        return int(self._table.size(*self._stream()))

    def capacity(self) -> int:
        return int(self._table.capacity())

    def load_factor(self) -> float:
        return float(self._table.load_factor(*self._stream()))

    def hbm_rows(self) -> int:
        """Slots whose value rows are in HBM (CUDA; the rest are in pinned host memory); all of them on the CPU."""
        return int(self._table.hbm_slots()) if self.is_cuda else self.capacity()

    def reserve(self, capacity: int) -> None:
        self._table.reserve(capacity, *self._stream())

    def clear(self) -> None:
        self._table.clear(*self._stream())

    def set_step(self, step: int) -> None:
        self._table.set_step(_u64(step))
        self.step = int(step)

    def set_epoch(self, epoch: int) -> None:
        if not 0 <= epoch < 2**32:
            raise ValueError(f"epoch must be in [0, 2^32), got {epoch}")
        self._table.set_epoch(epoch)
        self.epoch = int(epoch)

    @property
    def evicted_count(self) -> int:
        return int(self._table.evicted_count(*self._stream()))

    @property
    def rejected_count(self) -> int:
        return int(self._table.rejected_count(*self._stream()))

    def __len__(self) -> int:
        return self.size()


MAX_GROUP_TABLES: int = _C.MAX_GROUP_TABLES


def find_or_insert_embeddings_group(
    tables: Sequence[DynamicHashTable], keys: Tensor, bounds: Sequence[int], out: Tensor, status: Tensor
) -> None:
    """``tables[k].find_or_insert_embeddings(keys[bounds[k]:bounds[k + 1]], ...)`` for every k in one native call
    (one kernel launch on a GPU, so small tables do not each pay a launch and a tail): at most ``MAX_GROUP_TABLES``
    tables on one device with one dim; ``out [n, dim]``, ``status [n]`` as there. The caller makes sure that no key
    is reserved (a reserved key would only be counted, and the next inserting call of its table would raise);
    tables with policy ``"none"`` raise ``TableFullError`` as ``find_or_insert`` does."""
    first, keys = _check_group(tables, bounds, keys)
    n = keys.numel()
    _check_out(out, (n, first.dim), torch.float32, first.device, "out")
    _check_out(status, (n,), torch.int8, first.device, "status")
    type(first._table).find_or_insert_embeddings_group(
        [t._table for t in tables], list(bounds), keys.data_ptr(), out.data_ptr(), status.data_ptr(), *first._stream()
    )
    for k, t in enumerate(tables):
        if t.config.policy == "none":
            t._raise_if_full(status[bounds[k] : bounds[k + 1]], keys[bounds[k] : bounds[k + 1]])


def apply_optimizer_group(
    tables: Sequence[DynamicHashTable],
    keys: Tensor,
    bounds: Sequence[int],
    grads: Tensor,
    optimizers: Sequence[tuple[str, float, float, float, float, int]],
    found: Tensor,
    *,
    distinct: bool = False,
) -> None:
    """``tables[k].apply_optimizer`` on ``keys[bounds[k]:bounds[k + 1]]`` for every k in one native call, with table
    k's optimizer ``optimizers[k] = (kind, lr, eps, beta1, beta2, step)``; ``grads [n, dim]`` and ``found [n]``
    (written) as there, as is ``distinct``."""
    first, keys = _check_group(tables, bounds, keys)
    n = keys.numel()
    if len(optimizers) != len(tables):
        raise ValueError(f"need one optimizer per table, got {len(optimizers)} for {len(tables)} tables")
    for kind, *_ in optimizers:
        if kind not in _OPTIMIZERS:
            raise ValueError(f"optimizer kind must be one of {sorted(_OPTIMIZERS)}, got {kind!r}")
    _check_out(grads, (n, first.dim), torch.float32, first.device, "grads")
    _check_out(found, (n,), torch.bool, first.device, "found")
    params = [(_OPTIMIZERS[kind], *rest) for kind, *rest in optimizers]
    type(first._table).apply_optimizer_group(
        [t._table for t in tables], list(bounds), params, keys.data_ptr(), grads.data_ptr(), found.data_ptr(),
        distinct, *first._stream(),
    )  # fmt: skip


def _check_group(
    tables: Sequence[DynamicHashTable], bounds: Sequence[int], keys: Tensor
) -> tuple[DynamicHashTable, Tensor]:
    """(the group's first table, its checked keys): 1..MAX_GROUP_TABLES tables sharing device and dim, bounds that
    split exactly the keys."""
    if not 1 <= len(tables) <= MAX_GROUP_TABLES:
        raise ValueError(f"a group holds 1 to {MAX_GROUP_TABLES} tables, got {len(tables)}")
    if len(bounds) != len(tables) + 1:
        raise ValueError(f"a group of {len(tables)} tables needs {len(tables) + 1} bounds, got {len(bounds)}")
    first = tables[0]
    for t in tables:
        if t.device != first.device or t.dim != first.dim:
            raise ValueError(
                f"a group's tables share device and dim: {first.device}/{first.dim} and {t.device}/{t.dim}"
            )
    keys = first._keys(keys)
    if bounds[-1] != keys.numel():
        raise ValueError(f"the group's bounds end at {bounds[-1]}, but there are {keys.numel()} keys")
    return first, keys


def owner_ranks(keys: Tensor, world_size: int) -> Tensor:
    """Rank (``[0, world_size)``) that owns each key under row-wise sharding by key hash; int64, same shape."""
    if keys.dtype != torch.int64:
        raise TypeError(f"keys must be int64, got {keys.dtype}")
    if world_size <= 0:
        raise ValueError(f"world_size must be positive, got {world_size}")
    flat = keys.reshape(-1).cpu().contiguous()
    out = torch.empty_like(flat)
    _C.owner_ranks(flat.data_ptr(), flat.numel(), world_size, out.data_ptr())
    return out.view(keys.shape).to(keys.device)


def cuda_available() -> bool:
    """Whether CUDA tables can be made here: the extension was built with nvcc and torch sees a GPU."""
    return bool(_C.WITH_CUDA) and torch.cuda.is_available()


def _table_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"a dynamic table lives on 'cpu' or 'cuda[:index]', got {device}")
    if not _C.WITH_CUDA:
        raise RuntimeError(
            "gr_dynemb was built without its CUDA table (no nvcc when it was installed); reinstall with the CUDA "
            "toolkit on PATH (GR_DYNEMB_CUDA=on makes a missing nvcc an error)"
        )
    if not torch.cuda.is_available():
        raise RuntimeError(f"a table on {device} needs a CUDA device, and torch sees none")
    return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)


def _check_int64(keys: Tensor) -> Tensor:
    if not isinstance(keys, Tensor) or keys.dtype != torch.int64:
        raise TypeError(f"keys must be an int64 torch.Tensor, got {getattr(keys, 'dtype', type(keys).__name__)}")
    return keys


def _check_out(t: Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, name: str) -> None:
    """An output buffer the native table writes through its address: exact shape, dtype, device, contiguous."""
    if not isinstance(t, Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
        raise ValueError(
            f"{name} must be a {dtype} tensor of shape {list(shape)}, got "
            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
        )
    if t.device != device or not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous on {device}, got {t.device} (contiguous: {t.is_contiguous()})")


def _as_u64_bits(scores: Tensor, device: torch.device) -> Tensor:
    """Scores (int64 or uint64) as a contiguous int64 tensor of the same bits on ``device`` (the native tables read
    uint64; moving int64 avoids relying on uint64 copy kernels)."""
    if scores.dtype == torch.uint64:
        scores = scores.contiguous().view(torch.int64)
    return scores.to(device).contiguous()


def _u64(x: int) -> int:
    if not 0 <= int(x) < 2**64:
        raise ValueError(f"expected a value in [0, 2^64), got {x}")
    return int(x)
