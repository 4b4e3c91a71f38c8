"""InteractionLog validation and re-indexing, per-user sequences (order, ties, dropped users), leave-one-out."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from gr_models.data import InteractionLog, UserSequences, build_user_sequences, leave_one_out_split


def hand_log() -> InteractionLog:
    """User 10: raw items 1..6 at t=10..60 (listed out of order); user 20: items 7, 8, 9; user 30: one event."""
    users = [10, 10, 20, 10, 10, 10, 20, 20, 10, 30]
    items = [3, 1, 7, 2, 6, 4, 8, 9, 5, 1]
    ts = [30, 10, 5, 20, 60, 40, 6, 7, 50, 1]
    return InteractionLog.from_raw(np.array(users), np.array(items), np.array(ts), np.arange(10.0), "hand")


def raw_items(log: InteractionLog, items: np.ndarray) -> list[int]:
    return log.raw_item_ids[items].tolist()


def test_from_raw_reindexes_in_sorted_raw_order() -> None:
    log = hand_log()
    assert (log.num_users, log.num_items, len(log)) == (3, 9, 10)
    assert log.raw_user_ids.tolist() == [10, 20, 30] and log.raw_item_ids.tolist() == list(range(1, 10))
    assert log.users.tolist() == [0, 0, 1, 0, 0, 0, 1, 1, 0, 2] and log.items[:3].tolist() == [2, 0, 6]
    assert log.users.dtype == log.items.dtype == log.timestamps.dtype == np.int64
    assert log.ratings is not None and log.ratings.dtype == np.float32
    sparse = InteractionLog.from_raw([5, 10**12], [7, -3], [0, 1], None, "sparse ids")  # np.unique path
    assert sparse.raw_user_ids.tolist() == [5, 10**12] and sparse.items.tolist() == [1, 0]


def test_from_raw_declared_catalogue_keeps_unused_ids() -> None:
    log = InteractionLog.from_raw([0, 2], [4, 1], [1, 2], None, "declared", num_users=3, num_items=6)
    assert (log.num_users, log.num_items) == (3, 6) and log.items.tolist() == [4, 1]
    assert log.raw_item_ids.tolist() == list(range(6))
    with pytest.raises(
        ValueError, match=r"num_items=4 declares raw item ids as indices 0\.\.3, but they span \[1, 4\]"
    ):
        InteractionLog.from_raw([0, 2], [4, 1], [1, 2], None, "declared", num_items=4)


def test_interaction_log_validation() -> None:
    ok = {
        "users": np.array([0, 1]),
        "items": np.array([0, 0]),
        "timestamps": np.array([1, 2]),
        "ratings": None,
        "num_users": 2,
        "num_items": 1,
        "raw_user_ids": np.array([3, 4]),
        "raw_item_ids": np.array([9]),
        "source": "t",
    }
    InteractionLog(**ok)
    with pytest.raises(ValueError, match=r"items has 1 rows but users has 2"):
        InteractionLog(**{**ok, "items": np.array([0])})
    with pytest.raises(ValueError, match=r"timestamps must be a 1-D int64 numpy array, got int32\[2\]"):
        InteractionLog(**{**ok, "timestamps": np.array([1, 2], dtype=np.int32)})
    with pytest.raises(ValueError, match=r"users has indices in \[0, 2\], outside \[0, 2\)"):
        InteractionLog(**{**ok, "users": np.array([0, 2])})
    with pytest.raises(ValueError, match=r"raw_user_ids must be strictly increasing"):
        InteractionLog(**{**ok, "raw_user_ids": np.array([4, 3])})
    with pytest.raises(ValueError, match=r"ratings must be None or a 1-D float32"):
        InteractionLog(**{**ok, "ratings": np.array([1.0, 2.0])})
    with pytest.raises(ValueError, match=r"raw_items must hold whole numbers"):
        InteractionLog.from_raw([1], [1.5], [0], None, "t")
    with pytest.raises(ValueError, match=r"timestamps has 2 rows but raw_users has 1"):
        InteractionLog.from_raw([1], [1], [0, 1], None, "t")


def test_sequences_are_chronological_with_stable_ties() -> None:
    # user 0 has three events at t=5 listed as items 4, 2, 3: that order must survive
    log = InteractionLog.from_raw([0, 0, 1, 0, 0, 1], [4, 2, 9, 3, 1, 8], [5, 5, 2, 5, 1, 1], None, "ties")
    seqs = build_user_sequences(log, min_interactions=1)
    assert raw_items(log, seqs.items_of(0)) == [1, 4, 2, 3] and seqs.timestamps_of(0).tolist() == [1, 5, 5, 5]
    assert raw_items(log, seqs.items_of(1)) == [8, 9] and seqs.users.tolist() == [0, 1]
    assert seqs.offsets.tolist() == [0, 4, 6] and seqs.lengths.tolist() == [4, 2] and len(seqs) == 2


def test_sequences_carry_ratings_in_the_same_order() -> None:
    log = hand_log()
    seqs = build_user_sequences(log, min_interactions=3)
    assert raw_items(log, seqs.items_of(0)) == [1, 2, 3, 4, 5, 6]
    assert seqs.ratings_of(0).tolist() == [1.0, 3.0, 0.0, 5.0, 8.0, 4.0]  # the rating travels with its event


def test_users_with_too_few_interactions_are_dropped_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gr_models.data"):
        seqs = build_user_sequences(hand_log(), min_interactions=4)
    assert seqs.users.tolist() == [0] and seqs.num_dropped_users == 2 and seqs.num_dropped_interactions == 4
    assert "hand: dropped 2 of 3 users (4 interactions) with fewer than 4 interactions" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gr_models.data"):
        assert build_user_sequences(hand_log(), min_interactions=1).num_dropped_users == 0
    assert "dropped" not in caplog.text
    with pytest.raises(ValueError, match=r"no user has at least min_interactions=7"):
        build_user_sequences(hand_log(), min_interactions=7)
    with pytest.raises(ValueError, match=r"min_interactions must be >= 1"):
        build_user_sequences(hand_log(), min_interactions=0)


def test_leave_one_out_targets() -> None:
    log = hand_log()
    split = leave_one_out_split(build_user_sequences(log, min_interactions=3))
    assert raw_items(log, split.test_targets) == [6, 9] and split.test_target_timestamps.tolist() == [60, 7]
    assert raw_items(log, split.valid_targets) == [5, 8] and split.valid_target_timestamps.tolist() == [50, 6]
    assert raw_items(log, split.train.items_of(0)) == [1, 2, 3, 4] and split.train.timestamps_of(0).tolist() == [
        10,
        20,
        30,
        40,
    ]
    assert raw_items(log, split.train.items_of(1)) == [7]
    assert split.train.users.tolist() == split.full.users.tolist() == [0, 1]
    assert split.full.lengths.tolist() == [6, 3] and split.train.num_dropped_users == 1
    assert split.train.ratings is not None and split.train.ratings.tolist() == [1.0, 3.0, 0.0, 5.0, 2.0]


def test_leave_one_out_needs_three_events() -> None:
    seqs = build_user_sequences(hand_log(), min_interactions=1)
    with pytest.raises(ValueError, match=r">= 3 events per user .*1 of 3 users have fewer.*min_interactions >= 3"):
        leave_one_out_split(seqs)


def test_user_sequences_validation_and_drop_last() -> None:
    seqs = UserSequences(np.array([0, 1]), np.array([0, 3, 4]), np.array([0, 1, 2, 3]), np.arange(4), None, 4)
    assert seqs.drop_last(1).offsets.tolist() == [0, 2, 2] and seqs.drop_last(1).items.tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"cannot drop the last 2 events: 1 sequences are shorter"):
        seqs.drop_last(2)
    with pytest.raises(ValueError, match=r"offsets must be non-decreasing and end at len\(items\)"):
        UserSequences(np.array([0, 1]), np.array([0, 3, 5]), np.array([0, 1, 2, 3]), np.arange(4), None, 4)
    with pytest.raises(ValueError, match=r"items must lie in \[0, 3\)"):
        UserSequences(np.array([0, 1]), np.array([0, 3, 4]), np.array([0, 1, 2, 3]), np.arange(4), None, 3)
