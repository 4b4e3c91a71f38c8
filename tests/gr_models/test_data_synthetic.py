"""Synthetic generator: determinism, shapes, Zipf skew, no repeats, session timestamps, learnable sequence signal."""

from __future__ import annotations

import numpy as np
import pytest

from gr_models.data import (
    SyntheticConfig,
    build_user_sequences,
    generate_synthetic,
    leave_one_out_split,
    synthetic_item_topics,
)

SMALL = SyntheticConfig(num_users=300, num_items=400, num_topics=8, max_seq_len=80, seed=3)


def test_deterministic_by_seed() -> None:
    a, b = generate_synthetic(SMALL), generate_synthetic(SMALL)
    for name in ("users", "items", "timestamps", "ratings"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    c = generate_synthetic(SyntheticConfig(**{**SMALL.__dict__, "seed": 4}))
    assert not np.array_equal(a.items[:200], c.items[:200])


def test_shapes_and_ranges() -> None:
    log = generate_synthetic(SMALL)
    assert (log.num_users, log.num_items) == (SMALL.num_users, SMALL.num_items)  # the whole catalogue
    assert log.raw_item_ids.tolist() == list(range(SMALL.num_items)) and log.raw_user_ids.tolist() == list(range(300))
    assert log.items.dtype == log.timestamps.dtype == np.int64 and log.ratings is not None
    assert set(np.unique(log.ratings).tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert "synthetic(seed=3" in log.source
    lengths = np.bincount(log.users, minlength=SMALL.num_users)
    assert lengths.min() >= SMALL.min_seq_len and lengths.max() <= SMALL.max_seq_len
    assert np.median(lengths) < lengths.mean()  # log-uniform lengths: a long tail of heavy users


def test_sequences_never_repeat_items_and_time_moves_forward() -> None:
    log = generate_synthetic(SMALL)
    seqs = build_user_sequences(log, min_interactions=1)
    assert len(seqs) == SMALL.num_users and np.array_equal(seqs.items, log.items)  # generated in user-time order
    for p in range(len(seqs)):
        items = seqs.items_of(p)
        assert len(np.unique(items)) == len(items)
        assert (np.diff(seqs.timestamps_of(p)) > 0).all()
    gaps = np.diff(seqs.timestamps)[np.diff(log.users) == 0]
    assert np.median(gaps) < 3600 < np.quantile(gaps, 0.95)  # short gaps within sessions, long ones between


def test_zipf_popularity_skew() -> None:
    log = generate_synthetic(SyntheticConfig())
    counts = np.sort(np.bincount(log.items, minlength=log.num_items))[::-1]
    top_share = counts[: log.num_items // 10].sum() / counts.sum()
    assert top_share > 0.35  # ml-100k: 0.43; uniform popularity would give 0.10
    flat = generate_synthetic(SyntheticConfig(zipf_exponent=0.0, topic_popularity_exponent=0.0))
    flat_counts = np.sort(np.bincount(flat.items, minlength=flat.num_items))[::-1]
    assert flat_counts[:100].sum() / flat_counts.sum() < top_share - 0.15


def test_default_config_size() -> None:
    log = generate_synthetic(SyntheticConfig())
    assert log.num_users == 2000 and log.num_items == 1000
    assert len(log) > 2000 * 30


def test_last_item_predicts_the_next_better_than_popularity() -> None:
    """The structure a sequence model must find: the most recent item (its topic) beats global popularity."""
    log = generate_synthetic(SyntheticConfig(num_users=600, num_items=300, num_topics=10, max_seq_len=60, seed=1))
    split = leave_one_out_split(build_user_sequences(log))
    train, n = split.train, log.num_items
    popularity = np.bincount(train.items, minlength=n).astype(np.float64)
    within = np.diff(train.users.repeat(train.lengths)) == 0
    transitions = np.zeros((n, n))
    np.add.at(transitions, (train.items[:-1][within], train.items[1:][within]), 1.0)
    hits = np.zeros(2)
    for p in range(len(split.full)):
        history = split.full.items_of(p)[:-1]
        target = split.test_targets[p]
        for k, scores in enumerate((popularity.copy(), transitions[history[-1]] + 1e-3 * popularity)):
            scores[history] = -np.inf
            hits[k] += (scores > scores[target]).sum() < 10
    hr_popularity, hr_last_item = hits / len(split.full)
    assert hr_last_item > 1.5 * hr_popularity, (hr_popularity, hr_last_item)


def test_topic_walk_and_ratings_follow_taste() -> None:
    log = generate_synthetic(SMALL)
    topic = synthetic_item_topics(SMALL)[log.items]
    same_user = np.diff(log.users) == 0
    stay = (np.diff(topic) == 0)[same_user].mean()
    assert SMALL.topic_stickiness <= stay < 0.95  # sticky walk, plus re-draws that land on the same topic
    # a user's favourite topic (the one they consume most) earns higher ratings than their other topics
    per_user_topic = np.zeros((log.num_users, SMALL.num_topics))
    np.add.at(per_user_topic, (log.users, topic), 1.0)
    favourite = topic == per_user_topic.argmax(1)[log.users]
    assert log.ratings is not None
    assert log.ratings[favourite].mean() > log.ratings[~favourite].mean() + 0.5


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (
            {"num_items": 10, "num_topics": 2, "max_seq_len": 20, "min_seq_len": 5},
            r"max_seq_len \(20\) exceeds num_items \(10\)",
        ),
        ({"min_seq_len": 50, "max_seq_len": 20}, r"min_seq_len \(50\) exceeds max_seq_len \(20\)"),
        ({"num_topics": 2000}, r"num_topics \(2000\) exceeds num_items"),
        ({"topic_stickiness": 1.5}, r"topic_stickiness must be in \[0, 1\]"),
        ({"num_users": 0}, r"num_users must be >= 1"),
        ({"taste_concentration": 0.0}, r"taste_concentration must be > 0"),
    ],
)
def test_config_validation(changes: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SyntheticConfig(**changes)  # type: ignore[arg-type]
