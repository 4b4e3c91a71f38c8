"""Next-item datasets (shift, truncation, histories), jagged collation, the resumable sampler and the DataLoader."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from gr_models.data import (
    ITEM_FEATURE,
    EpochBatchSampler,
    InteractionLog,
    LeaveOneOutSplit,
    NextItemEvalDataset,
    NextItemTrainDataset,
    build_user_sequences,
    collate_sequences,
    leave_one_out_split,
    make_dataloader,
)


def split_of(lengths: list[int]) -> LeaveOneOutSplit:
    """User u has items 100*u + 0, 1, 2, ... at timestamps 1000*u + 0, 10, 20, ... (raw id == index)."""
    users = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.concatenate([np.arange(n) for n in lengths])
    log = InteractionLog.from_raw(
        users,
        100 * users + pos,
        1000 * users + 10 * pos,
        None,
        "grid",
        num_users=len(lengths),
        num_items=100 * len(lengths),
    )
    return leave_one_out_split(build_user_sequences(log))


def test_train_examples_shift_by_one_and_keep_the_most_recent(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gr_models.data"):
        ds = NextItemTrainDataset(split_of([8, 3, 4]).train, max_seq_len=3)
    # user 0 trains on 0..5 -> the last 4 items 2,3,4,5; user 1 has 1 training item (skipped); user 2 has 2
    assert len(ds) == 2 and ds.num_skipped_users == 1
    assert "1 of 3 users have fewer than 2 training items" in caplog.text
    ex = ds[0]
    assert ex.user == 0 and ex.history is None
    assert ex.items.tolist() == [2, 3, 4] and ex.target_items.tolist() == [3, 4, 5]
    assert ex.timestamps.tolist() == [20, 30, 40] and ex.target_timestamps.tolist() == [30, 40, 50]
    ex = ds[1]
    assert ex.user == 2 and ex.items.tolist() == [200] and ex.target_items.tolist() == [201]
    full = NextItemTrainDataset(split_of([8]).train, max_seq_len=50)[0]
    assert full.items.tolist() == [0, 1, 2, 3, 4] and full.target_items.tolist() == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="max_seq_len must be >= 1"):
        NextItemTrainDataset(split_of([8]).train, 0)


def test_eval_examples_history_target_and_truncation() -> None:
    split = split_of([8, 3])
    valid = NextItemEvalDataset(split, "valid", max_seq_len=3)
    test = NextItemEvalDataset(split, "test", max_seq_len=3)
    assert len(valid) == len(test) == 2
    v, t = valid[0], test[0]
    assert v.items.tolist() == [3, 4, 5] and v.timestamps.tolist() == [30, 40, 50]
    assert (
        v.history.tolist() == [0, 1, 2, 3, 4, 5]
        and v.target_items.tolist() == [6]
        and v.target_timestamps.tolist() == [60]
    )
    assert (
        t.items.tolist() == [4, 5, 6] and t.history.tolist() == [0, 1, 2, 3, 4, 5, 6] and t.target_items.tolist() == [7]
    )
    v1, t1 = valid[1], test[1]
    assert v1.items.tolist() == [100] and v1.history.tolist() == [100] and v1.target_items.tolist() == [101]
    assert (
        t1.items.tolist() == [100, 101]
        and t1.target_items.tolist() == [102]
        and t1.target_timestamps.tolist() == [1020]
    )
    with pytest.raises(ValueError, match="stage must be 'valid' or 'test', got 'train'"):
        NextItemEvalDataset(split, "train", 3)  # type: ignore[arg-type]


def test_collate_train_batch_is_jagged_without_padding() -> None:
    ds = NextItemTrainDataset(split_of([8, 4, 6]).train, max_seq_len=10)
    batch = collate_sequences([ds[0], ds[1], ds[2]])
    kjt = batch.features
    assert kjt.keys() == [ITEM_FEATURE] == ["item"]
    assert kjt.lengths().tolist() == [5, 1, 3] and batch.seq_offsets.tolist() == [0, 5, 6, 9]
    assert torch.equal(kjt.offsets(), batch.seq_offsets)
    assert kjt.values().tolist() == [0, 1, 2, 3, 4, 100, 200, 201, 202]  # concatenated, no padding
    assert batch.target_items.tolist() == [1, 2, 3, 4, 5, 101, 201, 202, 203]
    assert batch.timestamps.tolist() == [0, 10, 20, 30, 40, 1000, 2000, 2010, 2020]
    assert batch.target_timestamps.shape == batch.target_items.shape == (9,)
    assert batch.user_ids.tolist() == [0, 1, 2] and len(batch) == 3 and not batch.is_eval
    assert batch.max_seq_len == 5 and isinstance(batch.max_seq_len, int)
    assert batch.history_offsets is None and batch.history_items is None
    for t in (batch.user_ids, kjt.values(), batch.timestamps, batch.seq_offsets, batch.target_items):
        assert t.dtype == torch.int64


def test_collate_eval_batch_and_errors() -> None:
    split = split_of([8, 3])
    ds = NextItemEvalDataset(split, "test", max_seq_len=4)
    batch = collate_sequences([ds[0], ds[1]])
    assert batch.features.lengths().tolist() == [4, 2] and batch.features.values().tolist() == [3, 4, 5, 6, 100, 101]
    assert batch.target_items.tolist() == [7, 102] and batch.target_timestamps.tolist() == [70, 1020]
    assert batch.history_offsets.tolist() == [0, 7, 9] and batch.history_items.tolist() == [
        0,
        1,
        2,
        3,
        4,
        5,
        6,
        100,
        101,
    ]
    assert batch.is_eval and batch.max_seq_len == 4
    moved = batch.to("cpu")
    assert len(moved) == 2 and moved.max_seq_len == 4 and torch.equal(moved.history_items, batch.history_items)
    with pytest.raises(ValueError, match="empty batch"):
        collate_sequences([])
    train = NextItemTrainDataset(split.train, 4)
    with pytest.raises(ValueError, match="cannot mix training and evaluation examples"):
        collate_sequences([train[0], ds[0]])


def test_sampler_is_deterministic_per_epoch_and_resumable() -> None:
    s = EpochBatchSampler(10, 3, shuffle=True, seed=7)
    assert len(s) == 4
    e0 = list(s)
    torch.manual_seed(123)  # the global RNGs play no part
    np.random.seed(123)
    assert list(EpochBatchSampler(10, 3, shuffle=True, seed=7)) == e0
    assert sorted(i for b in e0 for i in b) == list(range(10)) and [len(b) for b in e0] == [3, 3, 3, 1]
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0 and sorted(i for b in e1 for i in b) == list(range(10))
    assert list(EpochBatchSampler(10, 3, shuffle=True, seed=8)) != e0
    for k in range(6):
        s.set_epoch(1, start_batch=k)
        assert list(s) == e1[k:]
    s.set_epoch(2)
    s.start_batch = 3
    e2_tail = list(s)
    s.set_epoch(2)  # resets start_batch
    assert s.start_batch == 0 and list(s)[3:] == e2_tail
    assert list(EpochBatchSampler(10, 3, shuffle=True, seed=7, start_batch=2)) == e0[2:]


def test_sampler_without_shuffle_and_drop_last() -> None:
    s = EpochBatchSampler(7, 3, shuffle=False, seed=0, drop_last=True)
    assert len(s) == 2 and list(s) == [[0, 1, 2], [3, 4, 5]]
    assert list(EpochBatchSampler(7, 3, shuffle=False, seed=0)) == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ValueError, match="at least one example"):
        EpochBatchSampler(0, 3, shuffle=True, seed=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        EpochBatchSampler(5, 0, shuffle=True, seed=0)


def test_dataloader_serves_the_sampler_batches() -> None:
    ds = NextItemTrainDataset(split_of([5, 6, 7, 8, 9]).train, max_seq_len=4)
    sampler = EpochBatchSampler(len(ds), 2, shuffle=True, seed=3)
    sampler.set_epoch(4, start_batch=1)
    expected = [collate_sequences([ds[i] for i in b]) for b in sampler]
    state = torch.get_rng_state()
    batches = list(make_dataloader(ds, sampler))
    assert torch.equal(torch.get_rng_state(), state)  # iterating does not advance the global torch RNG
    assert len(batches) == len(expected) == 2
    for got, want in zip(batches, expected, strict=True):
        assert torch.equal(got.user_ids, want.user_ids) and torch.equal(got.features.values(), want.features.values())
        assert torch.equal(got.target_items, want.target_items)
