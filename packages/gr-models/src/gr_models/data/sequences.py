"""Per-user chronological sequences (CSR arrays) and the leave-one-out split."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from gr_models.data.interactions import InteractionLog

log = logging.getLogger("gr_models.data")


@dataclass(frozen=True)
class UserSequences:
    """Sequence ``p`` (of user ``users[p]``) is ``items[offsets[p]:offsets[p + 1]]``, oldest first."""

    users: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    ratings: np.ndarray | None
    num_items: int
    num_dropped_users: int = 0  # users removed for having fewer than min_interactions events

    def __len__(self) -> int:
        return len(self.users)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def items_of(self, pos: int) -> np.ndarray:
        return self.items[self.offsets[pos] : self.offsets[pos + 1]]

    def timestamps_of(self, pos: int) -> np.ndarray:
        return self.timestamps[self.offsets[pos] : self.offsets[pos + 1]]

    def drop_last(self, k: int) -> UserSequences:
        """The same users with the last ``k`` events of every sequence removed (sequences must be longer than k)."""
        lengths = self.lengths - k
        if (lengths < 0).any():
            raise ValueError(f"cannot drop {k} events from sequences shorter than {k}")
        keep = np.ones(len(self.items), dtype=bool)
        for j in range(1, k + 1):
            keep[self.offsets[1:] - j] = False
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return UserSequences(
            self.users,
            offsets,
            self.items[keep],
            self.timestamps[keep],
            None if self.ratings is None else self.ratings[keep],
            self.num_items,
            self.num_dropped_users,
        )


def build_user_sequences(log_: InteractionLog, min_interactions: int = 3) -> UserSequences:
    """Groups events by user in chronological order; ties on timestamp keep their order in the source file.

    Users with fewer than ``min_interactions`` events are dropped; the number is logged and kept in
    ``num_dropped_users``.
    """
    if len(log_) == 0:
        raise ValueError(f"{log_.source}: no interactions")
    # lexsort is stable: equal (user, timestamp) keys keep the file order.
    order = np.lexsort((log_.timestamps, log_.users))
    users = log_.users[order]
    counts = np.bincount(users, minlength=log_.num_users)
    keep_user = counts >= min_interactions
    num_dropped = int((~keep_user[counts > 0]).sum())
    if num_dropped:
        log.info(
            "%s: dropped %d of %d users with fewer than %d interactions",
            log_.source,
            num_dropped,
            int((counts > 0).sum()),
            min_interactions,
        )
    keep = keep_user[users]
    order = order[keep]
    kept_users = np.flatnonzero(keep_user).astype(np.int64)
    if len(kept_users) == 0:
        raise ValueError(f"{log_.source}: no user has at least {min_interactions} interactions")
    offsets = np.concatenate([[0], np.cumsum(counts[kept_users])]).astype(np.int64)
    return UserSequences(
        users=kept_users,
        offsets=offsets,
        items=log_.items[order],
        timestamps=log_.timestamps[order],
        ratings=None if log_.ratings is None else log_.ratings[order],
        num_items=log_.num_items,
        num_dropped_users=num_dropped,
    )


@dataclass(frozen=True)
class LeaveOneOutSplit:
    """Last event of each user = test target, second-to-last = validation target, the rest = training."""

    train: UserSequences
    valid_targets: np.ndarray
    valid_target_timestamps: np.ndarray
    test_targets: np.ndarray
    test_target_timestamps: np.ndarray
    full: UserSequences


def leave_one_out_split(seqs: UserSequences) -> LeaveOneOutSplit:
    short = int((seqs.lengths < 3).sum())
    if short:
        raise ValueError(
            f"leave-one-out needs >= 3 events per user (train, validation, test); {short} users have fewer — "
            "build the sequences with min_interactions >= 3"
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
