"""Synthetic interaction logs with real structure, the embedded default that lets the main job run anywhere.

Items belong to topics and have Zipf popularity; users have a Dirichlet taste over topics; a user's sequence is a
sticky Markov walk over topics (stay with probability ``topic_stickiness``, else draw a new topic from the taste)
with items drawn by popularity inside the topic and never repeated; timestamps come in sessions (short gaps
inside, long gaps between); ratings grow with the user's taste for the item's topic. Next-item prediction
therefore rewards models that read the recent sequence (topic persistence) and the user's long-term taste, beyond
plain popularity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gr_models.data.interactions import InteractionLog


@dataclass(frozen=True)
class SyntheticConfig:
    num_users: int = 2000
    num_items: int = 1000
    num_topics: int = 20
    min_seq_len: int = 10
    max_seq_len: int = 120
    zipf_exponent: float = 1.1
    topic_stickiness: float = 0.8
    taste_concentration: float = 0.3  # Dirichlet parameter: small = users focus on few topics
    session_gap_s: float = 300.0  # mean gap between events of a session
    between_sessions_s: float = 2 * 86400.0  # mean gap between sessions
    new_session_prob: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_users < 1 or self.num_items < 1 or self.num_topics < 1:
            raise ValueError("num_users, num_items and num_topics must be >= 1")
        if not 1 <= self.min_seq_len <= self.max_seq_len:
            raise ValueError(f"need 1 <= min_seq_len <= max_seq_len, got {self.min_seq_len}, {self.max_seq_len}")
        if self.max_seq_len > self.num_items:
            raise ValueError(f"max_seq_len {self.max_seq_len} exceeds num_items {self.num_items} (items never repeat)")
        if not 0.0 <= self.topic_stickiness <= 1.0:
            raise ValueError(f"topic_stickiness must be in [0, 1], got {self.topic_stickiness}")
        if self.zipf_exponent < 0:
            raise ValueError(f"zipf_exponent must be >= 0, got {self.zipf_exponent}")


def generate_synthetic(config: SyntheticConfig | None = None) -> InteractionLog:
    cfg = config or SyntheticConfig()
    rng = np.random.default_rng(cfg.seed)
    n_items, n_topics = cfg.num_items, cfg.num_topics

    item_topic = rng.integers(n_topics, size=n_items)
    popularity = 1.0 / np.arange(1, n_items + 1, dtype=np.float64) ** cfg.zipf_exponent
    popularity = popularity[rng.permutation(n_items)]  # popularity independent of the item index
    topic_items = [np.flatnonzero(item_topic == t) for t in range(n_topics)]
    topic_cum = [np.cumsum(popularity[ids]) for ids in topic_items]
    global_cum = np.cumsum(popularity)

    # Log-uniform lengths: many short histories, a few long ones, as in real logs.
    lengths = np.exp(rng.uniform(np.log(cfg.min_seq_len), np.log(cfg.max_seq_len + 1), size=cfg.num_users))
    lengths = np.clip(lengths.astype(np.int64), cfg.min_seq_len, cfg.max_seq_len)

    users, items, stamps, ratings = [], [], [], []
    for user in range(cfg.num_users):
        length = int(lengths[user])
        taste = rng.dirichlet(np.full(n_topics, cfg.taste_concentration))
        draws = rng.choice(n_topics, size=length, p=taste)
        switch = rng.random(length) >= cfg.topic_stickiness
        switch[0] = True
        topics = draws[np.maximum.accumulate(np.where(switch, np.arange(length), 0))]
        uniforms = rng.random((length, 8))
        seen: set[int] = set()
        seq = np.empty(length, dtype=np.int64)
        for t in range(length):
            z = int(topics[t])
            item = -1
            if len(topic_items[z]):
                for u in uniforms[t]:  # rejection sampling by popularity inside the topic
                    cand = int(topic_items[z][np.searchsorted(topic_cum[z], u * topic_cum[z][-1], side="right")])
                    if cand not in seen:
                        item = cand
                        break
            while item < 0:  # topic exhausted or unlucky draws: any unseen item by global popularity
                cand = int(np.searchsorted(global_cum, rng.random() * global_cum[-1], side="right"))
                if cand not in seen:
                    item = cand
            seen.add(item)
            seq[t] = item
        new_session = rng.random(length) < cfg.new_session_prob
        gaps = np.where(
            new_session, rng.exponential(cfg.between_sessions_s, length), rng.exponential(cfg.session_gap_s, length)
        )
        start = 1_600_000_000 + rng.integers(0, 180 * 86400)
        ts = start + np.cumsum(np.ceil(gaps)).astype(np.int64)
        affinity = taste[item_topic[seq]] * n_topics  # > 1 for topics the user likes more than average
        rating = np.clip(np.round(3.0 + np.log1p(affinity) + rng.normal(0, 0.7, length)), 1, 5)
        users.append(np.full(length, user, dtype=np.int64))
        items.append(seq)
        stamps.append(ts)
        ratings.append(rating.astype(np.float32))

    return InteractionLog.from_raw(
        raw_users=np.concatenate(users),
        raw_items=np.concatenate(items),
        timestamps=np.concatenate(stamps),
        ratings=np.concatenate(ratings),
        source=f"synthetic(seed={cfg.seed}, users={cfg.num_users}, items={cfg.num_items})",
    )
