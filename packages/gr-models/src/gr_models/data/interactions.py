"""InteractionLog: a flat table of (user, item, timestamp, rating) events with contiguous indices."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class InteractionLog:
    """Events with users and items re-indexed to ``0..num_users-1`` / ``0..num_items-1``.

    ``raw_user_ids[u]`` / ``raw_item_ids[i]`` map an index back to the dataset's own id. Indices follow the sorted
    raw ids, so for MovieLens item ``1`` is index ``0``.
    """

    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    ratings: np.ndarray | None
    num_users: int
    num_items: int
    raw_user_ids: np.ndarray
    raw_item_ids: np.ndarray
    source: str

    def __post_init__(self) -> None:
        n = len(self.users)
        for name in ("items", "timestamps"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"InteractionLog.{name} has {len(getattr(self, name))} rows, users has {n}")
        if self.ratings is not None and len(self.ratings) != n:
            raise ValueError(f"InteractionLog.ratings has {len(self.ratings)} rows, users has {n}")
        for name in ("users", "items", "timestamps"):
            if getattr(self, name).dtype != np.int64:
                raise ValueError(f"InteractionLog.{name} must be int64, got {getattr(self, name).dtype}")
        if len(self.raw_user_ids) != self.num_users or len(self.raw_item_ids) != self.num_items:
            raise ValueError("InteractionLog raw id tables must have num_users / num_items entries")
        if n:
            if self.users.min() < 0 or self.users.max() >= self.num_users:
                raise ValueError(f"InteractionLog.users must lie in [0, {self.num_users})")
            if self.items.min() < 0 or self.items.max() >= self.num_items:
                raise ValueError(f"InteractionLog.items must lie in [0, {self.num_items})")

    def __len__(self) -> int:
        return len(self.users)

    @classmethod
    def from_raw(
        cls,
        raw_users: np.ndarray,
        raw_items: np.ndarray,
        timestamps: np.ndarray,
        ratings: np.ndarray | None,
        source: str,
    ) -> InteractionLog:
        """Re-indexes raw ids (any int64 values) to contiguous indices in sorted raw-id order."""
        raw_user_ids, users = np.unique(np.asarray(raw_users, dtype=np.int64), return_inverse=True)
        raw_item_ids, items = np.unique(np.asarray(raw_items, dtype=np.int64), return_inverse=True)
        return cls(
            users=users.astype(np.int64),
            items=items.astype(np.int64),
            timestamps=np.asarray(timestamps, dtype=np.int64),
            ratings=None if ratings is None else np.asarray(ratings, dtype=np.float32),
            num_users=len(raw_user_ids),
            num_items=len(raw_item_ids),
            raw_user_ids=raw_user_ids,
            raw_item_ids=raw_item_ids,
            source=source,
        )
