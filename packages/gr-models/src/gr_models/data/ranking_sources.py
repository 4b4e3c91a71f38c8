"""RankingLogs of MovieLens (ratings as actions, like = rating >= 4, rating regression) and of synthetic data."""

from __future__ import annotations

from os import PathLike

import numpy as np

from gr_models.data.interactions import InteractionLog
from gr_models.data.movielens import find_ratings_file, load_movielens
from gr_models.data.movielens_features import (
    ItemBags,
    UserFeatures,
    load_movielens_genres,
    load_movielens_user_features,
)
from gr_models.data.ranking import RankingLog
from gr_models.data.sequences import build_user_sequences
from gr_models.data.synthetic import SyntheticConfig, generate_synthetic, synthetic_item_topics

LIKE_THRESHOLD = 4.0  # "like" = rating >= 4 stars


def _with_user_id(features: UserFeatures, num_users: int) -> UserFeatures:
    """Prepends the user index itself as a categorical feature."""
    values = np.concatenate([np.arange(num_users, dtype=np.int64)[:, None], features.values], axis=1)
    return UserFeatures(("user_id", *features.names), values, (num_users, *features.cardinalities))


def rating_log_to_ranking(log: InteractionLog, user_features: UserFeatures, item_bags: ItemBags | None) -> RankingLog:
    """Ratings as action ids (index among the distinct rating values), ``like`` and ``rating`` labels."""
    if log.ratings is None:
        raise ValueError(f"{log.source} has no ratings: the ranking task needs them for its labels and actions")
    seqs = build_user_sequences(log, min_interactions=1)
    ratings = seqs.ratings
    assert ratings is not None
    levels = np.unique(log.ratings)
    return RankingLog(
        users=seqs.users,
        offsets=seqs.offsets,
        items=seqs.items,
        timestamps=seqs.timestamps,
        actions=np.searchsorted(levels, ratings).astype(np.int64),
        labels={"like": (ratings >= LIKE_THRESHOLD).astype(np.float32), "rating": ratings.astype(np.float32)},
        num_items=log.num_items,
        num_actions=len(levels),
        user_features=user_features,
        item_bags=item_bags,
        source=log.source,
    )


def load_movielens_ranking(
    name: str, data_dir: PathLike | str | None = None, *, download: bool = True, cache_dir: PathLike | None = None
) -> RankingLog:
    """MovieLens ``ml-100k``/``ml-1m`` with user id + attributes as user features and genres as item bags."""
    log = load_movielens(name, data_dir, download=download, cache_dir=cache_dir)
    ratings_file = find_ratings_file(name, data_dir, cache_dir)
    if ratings_file is None:  # load_movielens just found or fetched it
        raise FileNotFoundError(f"{name}: ratings file vanished after loading")
    folder = ratings_file.parent
    users = _with_user_id(load_movielens_user_features(name, folder, log), log.num_users)
    return rating_log_to_ranking(log, users, load_movielens_genres(name, folder, log))


def synthetic_ranking(config: SyntheticConfig | None = None) -> RankingLog:
    """The synthetic generator's log as a ranking task: its topic is each item's bag, and users carry their id
    and an activity level (log2 bucket of their number of events)."""
    cfg = config or SyntheticConfig()
    log = generate_synthetic(cfg)
    counts = np.bincount(log.users, minlength=log.num_users)
    activity = np.floor(np.log2(np.maximum(counts, 1))).astype(np.int64)
    base = UserFeatures(("activity",), activity[:, None], (int(activity.max()) + 1,))
    topics = synthetic_item_topics(cfg)
    bags = ItemBags.from_lists("topic", [[int(t)] for t in topics], cfg.num_topics)
    return rating_log_to_ranking(log, _with_user_id(base, log.num_users), bags)
