"""Per-user chronological sequences in CSR form, and the leave-one-out split."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from gr_models.data.interactions import InteractionLog

logger = logging.getLogger("gr_models.data")


@dataclass(frozen=True)
class UserSequences:
    """Sequence ``p`` belongs to user ``users[p]`` and is ``items[offsets[p]:offsets[p + 1]]``, oldest first.

    ``num_dropped_users`` / ``num_dropped_interactions`` record what ``build_user_sequences`` left out (users with
    fewer than its ``min_interactions`` events); they are carried along by ``drop_last``.
    """

    users: np.ndarray  # int64 [U], user index of each sequence
    offsets: np.ndarray  # int64 [U + 1]
    items: np.ndarray  # int64 [total]
    timestamps: np.ndarray  # int64 [total]
    ratings: np.ndarray | None  # float32 [total]
    num_items: int
    num_dropped_users: int = 0
    num_dropped_interactions: int = 0

    def __post_init__(self) -> None:
        for name in ("users", "offsets", "items", "timestamps"):
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.dtype != np.int64:
                raise ValueError(f"UserSequences.{name} must be a 1-D int64 numpy array")
        if len(self.offsets) != len(self.users) + 1 or self.offsets[0] != 0:
            raise ValueError(f"UserSequences.offsets must have {len(self.users) + 1} entries starting at 0")
        if self.offsets[-1] != len(self.items) or (np.diff(self.offsets) < 0).any():
            raise ValueError("UserSequences.offsets must be non-decreasing and end at len(items)")
        if len(self.timestamps) != len(self.items) or (
            self.ratings is not None and len(self.ratings) != len(self.items)
        ):
            raise ValueError("UserSequences.timestamps (and ratings) must have one entry per item")
        if len(self.items) and (self.items.min() < 0 or self.items.max() >= self.num_items):
            raise ValueError(f"UserSequences.items must lie in [0, {self.num_items})")

    def __len__(self) -> int:
        return len(self.users)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def items_of(self, pos: int) -> np.ndarray:
        return self.items[self.offsets[pos] : self.offsets[pos + 1]]

    def timestamps_of(self, pos: int) -> np.ndarray:
        return self.timestamps[self.offsets[pos] : self.offsets[pos + 1]]

    def ratings_of(self, pos: int) -> np.ndarray | None:
        return None if self.ratings is None else self.ratings[self.offsets[pos] : self.offsets[pos + 1]]

    def drop_last(self, k: int) -> UserSequences:
        """The same users with the ``k`` most recent events of every sequence removed."""
        lengths = self.lengths
        if k < 0 or (lengths < k).any():
            raise ValueError(f"cannot drop the last {k} events: {int((lengths < k).sum())} sequences are shorter")
        keep = np.ones(len(self.items), dtype=bool)
        for j in range(1, k + 1):
            keep[self.offsets[1:][lengths >= j] - j] = False
        offsets = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(lengths - k, out=offsets[1:])
        return UserSequences(
            users=self.users,
            offsets=offsets,
            items=self.items[keep],
            timestamps=self.timestamps[keep],
            ratings=None if self.ratings is None else self.ratings[keep],
            num_items=self.num_items,
            num_dropped_users=self.num_dropped_users,
            num_dropped_interactions=self.num_dropped_interactions,
        )


def _chronological_order(users: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """Row order by (user, timestamp); stable, so equal timestamps of a user keep their order in the log."""
    if len(users) == 0:
        return np.zeros(0, dtype=np.int64)
    t_min, t_max = int(timestamps.min()), int(timestamps.max())
    span = t_max - t_min + 1
    if int(users.max()) + 1 <= (2**63 - 1) // span:
        # One int64 key sorts ~8x faster than np.lexsort on two keys (20M rows: ~1.5 s instead of ~10 s).
        return np.argsort(users * span + (timestamps - t_min), kind="stable")
    return np.lexsort((timestamps, users))  # lexsort is stable too


def build_user_sequences(log: InteractionLog, min_interactions: int = 3) -> UserSequences:
    """Groups the log by user, each sequence in chronological order; equal timestamps keep the log's (file) order.

    Users with fewer than ``min_interactions`` events are dropped: their number is logged once at INFO on the
    ``gr_models.data`` logger and kept in ``num_dropped_users`` (with their events in ``num_dropped_interactions``).
    Users of the catalogue without any event count as dropped too. Sequences are ordered by user index.
    """
    if min_interactions < 1:
        raise ValueError(f"min_interactions must be >= 1, got {min_interactions}")
    if len(log) == 0:
        raise ValueError(f"{log.source}: the interaction log is empty")
    counts = np.bincount(log.users, minlength=log.num_users)
    kept_users = np.flatnonzero(counts >= min_interactions).astype(np.int64)
    num_dropped = log.num_users - len(kept_users)
    dropped_events = int(counts[counts < min_interactions].sum())
    if num_dropped:
        logger.info(
            "%s: dropped %d of %d users (%d interactions) with fewer than %d interactions",
            log.source,
            num_dropped,
            log.num_users,
            dropped_events,
            min_interactions,
        )
    if len(kept_users) == 0:
        raise ValueError(f"{log.source}: no user has at least min_interactions={min_interactions} interactions")
    rows = np.flatnonzero(counts[log.users] >= min_interactions) if num_dropped else np.arange(len(log))
    order = rows[_chronological_order(log.users[rows], log.timestamps[rows])]
    offsets = np.zeros(len(kept_users) + 1, dtype=np.int64)
    np.cumsum(counts[kept_users], out=offsets[1:])
    return UserSequences(
        users=kept_users,
        offsets=offsets,
        items=log.items[order],
        timestamps=log.timestamps[order],
        ratings=None if log.ratings is None else log.ratings[order],
        num_items=log.num_items,
        num_dropped_users=num_dropped,
        num_dropped_interactions=dropped_events,
    )


@dataclass(frozen=True)
class LeaveOneOutSplit:
    """Per user: last event = test target, second-to-last = validation target, the rest = training sequence."""

    train: UserSequences  # each sequence minus its last two events
    valid_targets: np.ndarray  # int64 [U]
    valid_target_timestamps: np.ndarray  # int64 [U]
    test_targets: np.ndarray  # int64 [U]
    test_target_timestamps: np.ndarray  # int64 [U]
    full: UserSequences  # the untruncated sequences


def leave_one_out_split(seqs: UserSequences) -> LeaveOneOutSplit:
    short = int((seqs.lengths < 3).sum())
    if short:
        raise ValueError(
            f"leave-one-out needs >= 3 events per user (>= 1 to train on, 1 validation and 1 test target); "
            f"{short} of {len(seqs)} users have fewer: build the sequences with min_interactions >= 3"
        )
    last = seqs.offsets[1:] - 1
    return LeaveOneOutSplit(
        train=seqs.drop_last(2),
        valid_targets=seqs.items[last - 1],
        valid_target_timestamps=seqs.timestamps[last - 1],
        test_targets=seqs.items[last],
        test_target_timestamps=seqs.timestamps[last],
        full=seqs,
    )
