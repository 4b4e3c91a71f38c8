"""Synthetic interaction logs with the structure of real ones: the embedded default that runs anywhere, offline.

Generative story:

- items: each belongs to one of ``num_topics`` topics (balanced sizes) and has a Zipf popularity
  ``rank ** -zipf_exponent`` with ranks shuffled across items and topics;
- users: a Dirichlet taste over topics (small ``taste_concentration`` = a few favourite topics) and a sequence
  length drawn log-uniformly in ``[min_seq_len, max_seq_len]`` (many short histories, a few long ones);
- a sequence is a sticky Markov walk over topics: stay in the current topic with probability
  ``topic_stickiness``, else draw the next topic from the taste; the item is drawn inside the topic in proportion
  to popularity among the items this user has not consumed yet (items never repeat);
- timestamps increase with exponential gaps, short inside a session and long between sessions;
- ratings 1..5 grow with the user's taste for the item's topic, plus noise.

So the next item is predictable from the recent items (same topic: co-occurrence a sequence model can learn) and
from the user's long-term taste, well beyond what global popularity explains.

Users are generated in lockstep (one vectorised step per sequence position), not one by one, which keeps the
default 2000 users x ~45 items well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gr_models.data.interactions import InteractionLog

_START_TIME = 1_600_000_000  # 2020-09-13, unix seconds
_REJECTION_ROUNDS = 16  # vectorised redraws of already consumed items before an exact draw per user
_CHUNK_CELLS = 1 << 25  # users per chunk x items: bounds the [users, items] "consumed" matrix to ~32 MB


@dataclass(frozen=True)
class SyntheticConfig:
    num_users: int = 2000
    num_items: int = 1000
    num_topics: int = 20
    min_seq_len: int = 10
    max_seq_len: int = 120
    zipf_exponent: float = 1.1
    topic_stickiness: float = 0.8  # probability that the next item stays in the current topic
    taste_concentration: float = 0.3  # Dirichlet concentration per topic: small = few favourite topics
    topic_popularity_exponent: float = 1.0  # topics are liked by many users in Zipf proportion to this exponent
    session_gap_s: float = 300.0  # mean gap between events inside a session
    between_sessions_s: float = 2 * 86400.0  # mean gap between sessions
    new_session_prob: float = 0.15  # probability that an event starts a new session
    rating_noise: float = 0.7  # standard deviation of the rating noise, in stars
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_users", "num_items", "num_topics", "min_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"SyntheticConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_topics > self.num_items:
            raise ValueError(f"num_topics ({self.num_topics}) exceeds num_items ({self.num_items}): empty topics")
        if self.min_seq_len > self.max_seq_len:
            raise ValueError(f"min_seq_len ({self.min_seq_len}) exceeds max_seq_len ({self.max_seq_len})")
        if self.max_seq_len > self.num_items:
            raise ValueError(
                f"max_seq_len ({self.max_seq_len}) exceeds num_items ({self.num_items}): items never repeat"
            )
        for name in ("topic_stickiness", "new_session_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SyntheticConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in (
            "zipf_exponent",
            "topic_popularity_exponent",
            "session_gap_s",
            "between_sessions_s",
            "rating_noise",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"SyntheticConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.taste_concentration <= 0:
            raise ValueError(f"taste_concentration must be > 0, got {self.taste_concentration}")


class _Catalogue:
    """Items grouped by topic with a cumulative popularity table, for vectorised draws inside a topic."""

    def __init__(self, cfg: SyntheticConfig, rng: np.random.Generator) -> None:
        n, t = cfg.num_items, cfg.num_topics
        self.item_topic = rng.permutation(np.arange(n) % t)  # balanced topic sizes, random membership
        ranks = rng.permutation(n) + 1.0
        self.popularity = ranks**-cfg.zipf_exponent
        self.by_topic = np.argsort(self.item_topic, kind="stable")  # item ids, grouped by topic
        self.topic_size = np.bincount(self.item_topic, minlength=t)
        self.topic_start = np.concatenate([[0], np.cumsum(self.topic_size)[:-1]])
        self.cum = np.cumsum(self.popularity[self.by_topic])  # popularity mass up to each grouped position
        self.mass_before = np.where(self.topic_start > 0, self.cum[self.topic_start - 1], 0.0)
        self.mass = self.cum[self.topic_start + self.topic_size - 1] - self.mass_before

    def draw(self, topics: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One item per entry of ``topics``, by popularity within that topic."""
        target = self.mass_before[topics] + rng.random(len(topics)) * self.mass[topics]
        pos = np.searchsorted(self.cum, target, side="right")
        # Float rounding can land one slot outside the topic's block: clamp into it.
        pos = np.clip(pos, self.topic_start[topics], self.topic_start[topics] + self.topic_size[topics] - 1)
        return self.by_topic[pos]

    def draw_unseen(self, topic: int, seen_row: np.ndarray, rng: np.random.Generator) -> int:
        """Exact draw among the unseen items of ``topic`` (the rare case where rejection kept failing)."""
        members = self.by_topic[self.topic_start[topic] : self.topic_start[topic] + self.topic_size[topic]]
        weights = np.where(seen_row[members], 0.0, self.popularity[members])
        cum = np.cumsum(weights)
        return int(members[min(np.searchsorted(cum, rng.random() * cum[-1], side="right"), len(members) - 1)])


def _walk_chunk(
    cfg: SyntheticConfig,
    cat: _Catalogue,
    taste: np.ndarray,
    lengths: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Item and topic matrices ``[users, max_len]`` (-1 past each length) for one chunk of users."""
    n_users, n_topics = taste.shape
    max_len = int(lengths.max())
    items = np.full((n_users, max_len), -1, dtype=np.int64)
    topics = np.full((n_users, max_len), -1, dtype=np.int64)
    seen = np.zeros((n_users, cfg.num_items), dtype=bool)
    left = np.broadcast_to(cat.topic_size, (n_users, n_topics)).copy()  # unseen items per (user, topic)
    taste_cum = np.cumsum(taste, axis=1)
    current = np.zeros(n_users, dtype=np.int64)
    for t in range(max_len):
        active = np.flatnonzero(lengths > t)
        stay = rng.random(len(active)) < cfg.topic_stickiness
        if t == 0:
            stay[:] = False
        fresh = np.minimum(
            (taste_cum[active] < rng.random(len(active))[:, None] * taste_cum[active, -1:]).sum(1), n_topics - 1
        )
        z = np.where(stay, current[active], fresh)
        exhausted = left[active, z] == 0
        if exhausted.any():  # the user consumed the whole topic: redraw from the taste over topics with items left
            for k in np.flatnonzero(exhausted):
                u = active[k]
                weights = taste[u] * (left[u] > 0)
                if weights.sum() <= 0:  # tastes can underflow to 0: fall back to any topic with items left
                    weights = (left[u] > 0).astype(np.float64)
                z[k] = min(
                    int(np.searchsorted(np.cumsum(weights), rng.random() * weights.sum(), side="right")), n_topics - 1
                )
        # Rejection sampling: drawing by popularity and redrawing consumed items is exactly a draw by popularity
        # among the unconsumed items, done for all users at once.
        chosen = cat.draw(z, rng)
        pending = np.flatnonzero(seen[active, chosen])
        for _ in range(_REJECTION_ROUNDS):
            if len(pending) == 0:
                break
            chosen[pending] = cat.draw(z[pending], rng)
            pending = pending[seen[active[pending], chosen[pending]]]
        for k in pending:
            chosen[k] = cat.draw_unseen(int(z[k]), seen[active[k]], rng)
        seen[active, chosen] = True
        left[active, z] -= 1
        current[active] = z
        items[active, t] = chosen
        topics[active, t] = z
    return items, topics


def synthetic_item_topics(config: SyntheticConfig | None = None) -> np.ndarray:
    """The topic of every item of ``generate_synthetic(config)`` (int64 [num_items]), for analysis and tests."""
    cfg = config or SyntheticConfig()
    return _Catalogue(cfg, np.random.default_rng(cfg.seed)).item_topic.astype(np.int64)


def generate_synthetic(config: SyntheticConfig | None = None) -> InteractionLog:
    """A deterministic (per ``config.seed``) synthetic log; users are ``0..num_users-1``, items ``0..num_items-1``.

    Rows are grouped by user in chronological order. ``num_items`` is the whole catalogue, including items that
    happen to receive no event.
    """
    cfg = config or SyntheticConfig()
    rng = np.random.default_rng(cfg.seed)
    cat = _Catalogue(cfg, rng)  # drawn first, so synthetic_item_topics can replay it
    # Dirichlet mean ∝ Zipf over topics: some topics are mainstream, others niche (topic 0 is the most liked).
    topic_share = np.arange(1, cfg.num_topics + 1, dtype=np.float64) ** -cfg.topic_popularity_exponent
    alpha = cfg.taste_concentration * cfg.num_topics * topic_share / topic_share.sum()
    taste = rng.dirichlet(alpha, size=cfg.num_users)
    log_len = rng.uniform(np.log(cfg.min_seq_len), np.log(cfg.max_seq_len + 1), size=cfg.num_users)
    lengths = np.clip(np.exp(log_len).astype(np.int64), cfg.min_seq_len, cfg.max_seq_len)

    chunk = max(1, _CHUNK_CELLS // cfg.num_items)
    item_parts, topic_parts = [], []
    for lo in range(0, cfg.num_users, chunk):
        hi = min(lo + chunk, cfg.num_users)
        items, topics = _walk_chunk(cfg, cat, taste[lo:hi], lengths[lo:hi], rng)
        valid = items >= 0  # row-major: user by user, oldest first
        item_parts.append(items[valid])
        topic_parts.append(topics[valid])
    items = np.concatenate(item_parts)
    topics = np.concatenate(topic_parts)
    users = np.repeat(np.arange(cfg.num_users, dtype=np.int64), lengths)
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # row of each user's first event

    # Sessions: an event opens a new session with probability new_session_prob (a user's first event always does).
    n = len(items)
    new_session = rng.random(n) < cfg.new_session_prob
    new_session[first] = True
    gaps = np.where(new_session, rng.exponential(cfg.between_sessions_s, n), rng.exponential(cfg.session_gap_s, n))
    gaps = np.ceil(gaps).astype(np.int64) + 1  # >= 1 s, so a user's timestamps strictly increase
    gaps[first] = rng.integers(0, 180 * 86400, size=cfg.num_users)  # users join over half a year
    cum = np.cumsum(gaps)
    user_base = np.repeat(cum[first] - gaps[first], lengths)  # restart the running sum at each user
    timestamps = _START_TIME + cum - user_base

    # Ratings: affinity = taste for the item's topic relative to a uniform taste (1 = indifferent).
    affinity = taste[users, topics] * cfg.num_topics
    score = 3.0 + 1.2 * np.log(np.maximum(affinity, 1e-3)) + rng.normal(0.0, cfg.rating_noise, n)
    ratings = np.clip(np.rint(score), 1, 5).astype(np.float32)

    return InteractionLog.from_raw(
        users,
        items,
        timestamps,
        ratings,
        source=f"synthetic(seed={cfg.seed}, users={cfg.num_users}, items={cfg.num_items}, topics={cfg.num_topics})",
        num_users=cfg.num_users,
        num_items=cfg.num_items,
    )
