"""A dict that keeps at most ``limit`` entries, dropping the least recently used: the memos of the serving path
(CUDA-graph buckets, pass layouts, window layouts)."""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LruDict(OrderedDict[K, V]):
    """``lookup`` and ``store`` mark their key most recently used; ``store`` then drops the least recently used
    entries beyond ``limit``. Plain dict access neither reorders nor evicts."""

    def __init__(self, limit: int) -> None:
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"LruDict limit must be an int >= 1, got {limit!r}")
        super().__init__()
        self.limit = limit

    def lookup(self, key: K) -> V | None:
        """The value of ``key`` (now the most recently used), or None when absent."""
        if key not in self:
            return None
        self.move_to_end(key)
        return self[key]

    def store(self, key: K, value: V) -> V:
        """Keeps ``value`` under ``key`` as the most recently used entry; returns it."""
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)
        return value
