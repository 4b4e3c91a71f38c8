"""InteractionLog: a flat table of (user, item, timestamp, rating) events with contiguous user and item indices."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike


def _int64_column(name: str, values: ArrayLike) -> np.ndarray:
    """``values`` as a 1-D int64 array; floats are accepted only when every value is a whole number."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind in "iu":
        if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{name} has values beyond the int64 range")
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.floor(arr)).any():
            raise ValueError(f"{name} must hold whole numbers, got non-integral or non-finite values")
        return arr.astype(np.int64)
    if arr.size == 0:  # np.asarray([]) is float64; an empty column of any dtype is fine
        return arr.astype(np.int64)
    raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")


@dataclass(frozen=True)
class InteractionLog:
    """Events with users and items re-indexed to ``0..num_users-1`` / ``0..num_items-1``.

    ``raw_user_ids[u]`` / ``raw_item_ids[i]`` map an index back to the dataset's own id. Indices follow the sorted
    raw ids, so MovieLens item ``1`` is index ``0``. Rows keep the order of the source (file order), which
    ``build_user_sequences`` relies on to break timestamp ties.
    """

    users: np.ndarray  # int64 [n]
    items: np.ndarray  # int64 [n]
    timestamps: np.ndarray  # int64 [n], unix seconds
    ratings: np.ndarray | None  # float32 [n]
    num_users: int
    num_items: int
    raw_user_ids: np.ndarray  # int64 [num_users], strictly increasing
    raw_item_ids: np.ndarray  # int64 [num_items], strictly increasing
    source: str

    def __post_init__(self) -> None:
        n = len(self.users)
        columns = {"users": self.users, "items": self.items, "timestamps": self.timestamps}
        for name, arr in {**columns, "raw_user_ids": self.raw_user_ids, "raw_item_ids": self.raw_item_ids}.items():
            if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.dtype != np.int64:
                got = f"{arr.dtype}{list(arr.shape)}" if isinstance(arr, np.ndarray) else type(arr).__name__
                raise ValueError(f"InteractionLog.{name} must be a 1-D int64 numpy array, got {got}")
        for name, arr in columns.items():
            if len(arr) != n:
                raise ValueError(f"InteractionLog.{name} has {len(arr)} rows but users has {n}")
        if self.ratings is not None:
            if not isinstance(self.ratings, np.ndarray) or self.ratings.ndim != 1 or self.ratings.dtype != np.float32:
                raise ValueError("InteractionLog.ratings must be None or a 1-D float32 numpy array")
            if len(self.ratings) != n:
                raise ValueError(f"InteractionLog.ratings has {len(self.ratings)} rows but users has {n}")
        for what, count, raw in (
            ("user", self.num_users, self.raw_user_ids),
            ("item", self.num_items, self.raw_item_ids),
        ):
            if count < 0:
                raise ValueError(f"InteractionLog.num_{what}s must be >= 0, got {count}")
            if len(raw) != count:
                raise ValueError(f"InteractionLog.raw_{what}_ids has {len(raw)} entries, num_{what}s is {count}")
            if count > 1 and not (np.diff(raw) > 0).all():
                raise ValueError(f"InteractionLog.raw_{what}_ids must be strictly increasing (sorted, unique)")
        if n:
            for name, arr, count in (("users", self.users, self.num_users), ("items", self.items, self.num_items)):
                lo, hi = int(arr.min()), int(arr.max())
                if lo < 0 or hi >= count:
                    raise ValueError(f"InteractionLog.{name} has indices in [{lo}, {hi}], outside [0, {count})")

    def __len__(self) -> int:
        return len(self.users)

    @classmethod
    def from_raw(
        cls,
        raw_users: ArrayLike,
        raw_items: ArrayLike,
        timestamps: ArrayLike,
        ratings: ArrayLike | None,
        source: str,
        *,
        num_users: int | None = None,
        num_items: int | None = None,
    ) -> InteractionLog:
        """Builds a log from raw ids, remapped to contiguous indices in sorted raw-id order.

        By default the catalogue is the set of ids that occur. ``num_users`` / ``num_items`` declare instead that
        the raw ids already are indices ``0..num-1`` of a catalogue of that size (e.g. synthetic data): they are
        kept as they are, so that catalogue entries without any event still count.
        """
        columns = {
            "raw_users": _int64_column("raw_users", raw_users),
            "raw_items": _int64_column("raw_items", raw_items),
            "timestamps": _int64_column("timestamps", timestamps),
        }
        n = len(columns["raw_users"])
        for name, arr in columns.items():
            if len(arr) != n:
                raise ValueError(f"from_raw: {name} has {len(arr)} rows but raw_users has {n}")
        rating_column = None
        if ratings is not None:
            rating_column = np.asarray(ratings, dtype=np.float32)
            if rating_column.shape != (n,):
                raise ValueError(f"from_raw: ratings has shape {rating_column.shape}, expected ({n},)")
        user_ids, users = _index("user", columns["raw_users"], num_users)
        item_ids, items = _index("item", columns["raw_items"], num_items)
        return cls(
            users=users,
            items=items,
            timestamps=columns["timestamps"],
            ratings=rating_column,
            num_users=len(user_ids),
            num_items=len(item_ids),
            raw_user_ids=user_ids,
            raw_item_ids=item_ids,
            source=source,
        )


def _index(what: str, raw: np.ndarray, declared: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(sorted catalogue of raw ids, index of each row) for the observed ids or a declared 0-based catalogue."""
    if declared is None:
        if len(raw) and raw.min() >= 0 and raw.max() < max(4 * len(raw), 1 << 20):
            # Dense enough ids (MovieLens): a presence table is O(n), where np.unique sorts all n rows.
            present = np.zeros(int(raw.max()) + 1, dtype=bool)
            present[raw] = True
            return np.flatnonzero(present).astype(np.int64), (np.cumsum(present) - 1)[raw]
        catalogue, index = np.unique(raw, return_inverse=True)
        return catalogue.astype(np.int64, copy=False), index.reshape(-1).astype(np.int64, copy=False)
    if declared < 0:
        raise ValueError(f"from_raw: num_{what}s must be >= 0, got {declared}")
    if len(raw) and (raw.min() < 0 or raw.max() >= declared):
        raise ValueError(
            f"from_raw: num_{what}s={declared} declares raw {what} ids as indices 0..{declared - 1}, "
            f"but they span [{raw.min()}, {raw.max()}]"
        )
    return np.arange(declared, dtype=np.int64), raw
