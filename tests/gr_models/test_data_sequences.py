"""Leave-one-out split, truncation, jagged batches, the resumable sampler and the synthetic generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gr_models.data import (
    EpochBatchSampler,
    InteractionLog,
    NextItemEvalDataset,
    NextItemTrainDataset,
    SyntheticConfig,
    build_user_sequences,
    collate_sequences,
    generate_synthetic,
    leave_one_out_split,
)


def _log() -> InteractionLog:
    # user 10: items 1..6 at t=10..60; user 20: items 7, 8, 9; user 30: one event (dropped)
    users = [10] * 6 + [20] * 3 + [30]
    items = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1]
    ts = [10, 20, 30, 40, 50, 60, 5, 6, 7, 1]
    return InteractionLog.from_raw(np.array(users), np.array(items), np.array(ts), None, "hand")


def test_leave_one_out_targets() -> None:
    seqs = build_user_sequences(_log(), min_interactions=3)
    split = leave_one_out_split(seqs)
    raw = _log().raw_item_ids
    assert raw[split.test_targets].tolist() == [6, 9]
    assert raw[split.valid_targets].tolist() == [5, 8]
    assert split.test_target_timestamps.tolist() == [60, 7]
    assert raw[split.train.items_of(0)].tolist() == [1, 2, 3, 4]
    assert raw[split.train.items_of(1)].tolist() == [7]


def test_leave_one_out_needs_three_events() -> None:
    seqs = build_user_sequences(_log(), min_interactions=1)
    with pytest.raises(ValueError, match="1 users have fewer"):
        leave_one_out_split(seqs)


def test_train_examples_shift_and_truncate_to_most_recent() -> None:
    split = leave_one_out_split(build_user_sequences(_log(), min_interactions=3))
    ds = NextItemTrainDataset(split.train, max_seq_len=2)
    assert len(ds) == 1 and ds.num_skipped_users == 1  # user 20 has a single training item
    ex = ds[0]
    assert ex.items.tolist() == [1, 2] and ex.target_items.tolist() == [2, 3]  # indices of raw items 2,3 -> 3,4
    assert ex.timestamps.tolist() == [20, 30] and ex.target_timestamps.tolist() == [30, 40]


def test_eval_examples_history_and_truncation() -> None:
    split = leave_one_out_split(build_user_sequences(_log(), min_interactions=3))
    valid = NextItemEvalDataset(split, "valid", max_seq_len=3)[0]
    test = NextItemEvalDataset(split, "test", max_seq_len=3)[0]
    assert valid.items.tolist() == [1, 2, 3] and valid.history.tolist() == [0, 1, 2, 3] and valid.target_items == [4]
    assert test.items.tolist() == [2, 3, 4] and test.history.tolist() == [0, 1, 2, 3, 4] and test.target_items == [5]
    with pytest.raises(ValueError, match="stage"):
        NextItemEvalDataset(split, "train", 3)  # type: ignore[arg-type]


def test_collate_is_jagged_without_padding() -> None:
    split = leave_one_out_split(build_user_sequences(_log(), min_interactions=3))
    ds = NextItemEvalDataset(split, "test", max_seq_len=10)
    batch = collate_sequences([ds[0], ds[1]])
    assert batch.features.keys() == ["item"]
    assert batch.features.lengths().tolist() == [5, 2] and batch.seq_offsets.tolist() == [0, 5, 7]
    assert batch.features.values().numel() == 7 and batch.timestamps.numel() == 7 and batch.max_seq_len == 5
    assert batch.target_items.shape == (2,) and batch.history_offsets.tolist() == [0, 5, 7]
    assert len(batch.to("cpu")) == 2
    with pytest.raises(ValueError, match="empty batch"):
        collate_sequences([])
    train = NextItemTrainDataset(split.train, 10)
    with pytest.raises(ValueError, match="cannot mix"):
        collate_sequences([train[0], ds[0]])


def test_sampler_deterministic_resumable() -> None:
    s = EpochBatchSampler(10, 3, shuffle=True, seed=7)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(0)
    assert list(s) == e0 and len(e0) == len(s) == 4
    assert sorted(i for b in e0 for i in b) == list(range(10))
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0
    s.set_epoch(1)
    s.start_batch = 2
    assert list(s) == e1[2:]
    assert len(EpochBatchSampler(10, 3, shuffle=False, seed=0, drop_last=True)) == 3


def test_synthetic_structure() -> None:
    cfg = SyntheticConfig(num_users=300, num_items=400, num_topics=8, seed=3)
    a, b = generate_synthetic(cfg), generate_synthetic(cfg)
    assert np.array_equal(a.items, b.items) and np.array_equal(a.timestamps, b.timestamps)
    assert not np.array_equal(a.items, generate_synthetic(SyntheticConfig(num_users=300, num_items=400, seed=4)).items)
    seqs = build_user_sequences(a, min_interactions=1)
    assert len(seqs) == 300
    for p in range(len(seqs)):
        items = seqs.items_of(p)
        assert len(np.unique(items)) == len(items)  # never repeated
        assert (np.diff(seqs.timestamps_of(p)) >= 0).all()
        assert cfg.min_seq_len <= len(items) <= cfg.max_seq_len
    counts = np.sort(np.bincount(a.items, minlength=a.num_items))[::-1]
    assert counts[: a.num_items // 10].sum() > 0.3 * counts.sum()  # Zipf: top 10% of items take > 30% of events
    with pytest.raises(ValueError, match="exceeds num_items"):
        SyntheticConfig(num_items=10, max_seq_len=20)


def test_batch_targets_match_dataset() -> None:
    log = generate_synthetic(SyntheticConfig(num_users=50, num_items=100, num_topics=4, max_seq_len=40))
    split = leave_one_out_split(build_user_sequences(log))
    ds = NextItemTrainDataset(split.train, 16)
    batch = collate_sequences([ds[i] for i in range(5)])
    assert torch.equal(batch.features.values()[1:3], batch.target_items[0:2])  # next-item shift inside sequence 0
