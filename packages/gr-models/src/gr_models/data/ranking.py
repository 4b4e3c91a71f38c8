"""Ranking data: per-user event logs with actions and task labels -> candidate windows -> jagged ranking batches.

A *window* is ``K`` consecutive events of one user (the candidates, each with its labels) plus the events before
them (the history, with the actions the user took, truncated to the most recent ``max_history``).

Split (``ranking_split``), by time within every user: the user's last window is the test window, the ``K``
events before it the validation window, and the events before those are cut into training windows of ``K``
walking backwards (stride ``train_stride``, default ``K``). A window whose history would hold fewer than
``min_history`` events is dropped (so short users may have no validation or training window). Every model sees
the same windows, so HSTU and the DLRM baseline are compared on the same split; no label of a validation or test
window is ever trained on, while their earlier events (with actions) are history, as at serving time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gr_models.data.batching import EpochBatchSampler
from gr_models.data.movielens_features import ItemBags, UserFeatures


class RankingDataError(ValueError):
    """Ranking data is inconsistent (lengths, ranges, label names)."""


@dataclass(frozen=True)
class RankingLog:
    """Chronological events per user: sequence ``p`` (user ``users[p]``) is rows ``offsets[p]:offsets[p + 1]``.

    ``actions`` are the action ids shown in the history (e.g. the star rating, or a bitmask of click/like/...);
    ``labels[name]`` are the per-event targets of the tasks (``like``, ``rating``, ``is_click``, ...).
    ``user_features.values`` are per user index (``users[p]`` selects a row).
    """

    users: np.ndarray  # int64 [U]
    offsets: np.ndarray  # int64 [U + 1]
    items: np.ndarray  # int64 [total]
    timestamps: np.ndarray  # int64 [total]
    actions: np.ndarray  # int64 [total] in [0, num_actions)
    labels: dict[str, np.ndarray]  # float32 [total] each
    num_items: int
    num_actions: int
    user_features: UserFeatures
    item_bags: ItemBags | None
    source: str

    def __post_init__(self) -> None:
        total = len(self.items)
        if len(self.offsets) != len(self.users) + 1 or self.offsets[0] != 0 or self.offsets[-1] != total:
            raise RankingDataError("RankingLog.offsets must have len(users) + 1 entries from 0 to len(items)")
        for name in ("timestamps", "actions"):
            if len(getattr(self, name)) != total:
                raise RankingDataError(f"RankingLog.{name} has {len(getattr(self, name))} rows, items has {total}")
        if not self.labels:
            raise RankingDataError("RankingLog needs at least one label column")
        for name, col in self.labels.items():
            if col.shape != (total,) or col.dtype != np.float32:
                raise RankingDataError(f"RankingLog.labels[{name!r}] must be float32 [{total}]")
        if total and (self.items.min() < 0 or self.items.max() >= self.num_items):
            raise RankingDataError(f"RankingLog.items must lie in [0, {self.num_items})")
        if total and (self.actions.min() < 0 or self.actions.max() >= self.num_actions):
            raise RankingDataError(f"RankingLog.actions must lie in [0, {self.num_actions})")
        if len(self.users) and self.users.max() >= len(self.user_features.values):
            raise RankingDataError("RankingLog.users index past the user feature table")
        if self.item_bags is not None and self.item_bags.num_items != self.num_items:
            raise RankingDataError(
                f"RankingLog.item_bags covers {self.item_bags.num_items} items, the log has {self.num_items}"
            )


@dataclass(frozen=True)
class RankingWindows:
    """Window ``w``: sequence ``seq[w]``, history rows ``[hist_start[w], cand_start[w])``, candidates
    ``[cand_start[w], cand_end[w])`` (absolute rows of the RankingLog)."""

    seq: np.ndarray
    hist_start: np.ndarray
    cand_start: np.ndarray
    cand_end: np.ndarray

    def __len__(self) -> int:
        return len(self.seq)


def _windows(rows: list[tuple[int, int, int, int]]) -> RankingWindows:
    arr = np.array(rows, dtype=np.int64).reshape(-1, 4)
    return RankingWindows(arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2].copy(), arr[:, 3].copy())


def ranking_split(
    log: RankingLog,
    num_candidates: int = 10,
    max_history: int = 100,
    min_history: int = 1,
    train_stride: int | None = None,
) -> dict[str, RankingWindows]:
    """Train / valid / test windows by time within each user (see the module docstring)."""
    if num_candidates < 1 or max_history < 0 or min_history < 0:
        raise ValueError(
            f"num_candidates must be >= 1 and max_history/min_history >= 0, got {num_candidates}, {max_history}, "
            f"{min_history}"
        )
    if min_history > max_history:
        raise ValueError(f"min_history ({min_history}) exceeds max_history ({max_history})")
    stride = num_candidates if train_stride is None else train_stride
    if stride < 1:
        raise ValueError(f"train_stride must be >= 1, got {stride}")
    k = num_candidates
    out: dict[str, list[tuple[int, int, int, int]]] = {"train": [], "valid": [], "test": []}
    for p in range(len(log.users)):
        start, end = int(log.offsets[p]), int(log.offsets[p + 1])
        if end - start < k:
            continue
        # Candidate starts, newest first: test, valid, then training windows walking back by the stride.
        starts = [("test", end - k), ("valid", end - 2 * k)]
        starts += [("train", c) for c in range(end - 3 * k, start + min_history - 1, -stride)]
        for stage, cand_start in starts:
            if cand_start - start >= min_history:
                out[stage].append((p, max(start, cand_start - max_history), cand_start, cand_start + k))
    return {stage: _windows(rows) for stage, rows in out.items()}


@dataclass
class RankingBatch:
    """Jagged ranking batch of ``B`` windows; ``H``/``T`` = total history events / candidates in the batch.

    ``*_bag_values``/``*_bag_lengths`` hold each token's item bag (genres, tags): one bag per history event or
    candidate, in token order (empty when the dataset has none).
    """

    users: torch.Tensor  # int64 [B] user index (GAUC groups)
    user_features: torch.Tensor  # int64 [B, F]
    history_lengths: torch.Tensor  # int64 [B]
    history_items: torch.Tensor  # int64 [H]
    history_actions: torch.Tensor  # int64 [H]
    history_timestamps: torch.Tensor  # int64 [H]
    history_bag_values: torch.Tensor  # int64 [nnz]
    history_bag_lengths: torch.Tensor  # int64 [H]
    candidate_lengths: torch.Tensor  # int64 [B]
    candidate_items: torch.Tensor  # int64 [T]
    candidate_timestamps: torch.Tensor  # int64 [T]
    candidate_bag_values: torch.Tensor  # int64 [nnz]
    candidate_bag_lengths: torch.Tensor  # int64 [T]
    request_timestamps: torch.Tensor  # int64 [B]: time of the window's first candidate
    labels: dict[str, torch.Tensor]  # float32 [T] each

    def __len__(self) -> int:
        return int(self.users.numel())

    @property
    def candidate_users(self) -> torch.Tensor:
        """User index of every candidate ``[T]``."""
        return torch.repeat_interleave(self.users, self.candidate_lengths)

    def to(self, device: torch.device | str) -> RankingBatch:
        moved: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = {k: v.to(device) for k, v in value.items()} if isinstance(value, dict) else value.to(device)
        return RankingBatch(**moved)


def _gather_rows(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(starts[i], ends[i])`` for all i."""
    lengths = ends - starts
    if lengths.sum() == 0:
        return np.zeros(0, dtype=np.int64)
    base = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return base + np.arange(int(lengths.sum()))


class RankingDataset(Dataset[int]):
    """Windows of a RankingLog; items are window indices, ``collate`` builds the RankingBatch of a list of them."""

    def __init__(self, log: RankingLog, windows: RankingWindows) -> None:
        if len(windows) == 0:
            raise RankingDataError(f"{log.source}: no windows for this stage (users too short for the split?)")
        self.log = log
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, idx: int) -> int:
        return idx

    def _bags(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        bags = self.log.item_bags
        if bags is None:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(len(rows), dtype=torch.int64)
        items = self.log.items[rows]
        starts, ends = bags.offsets[items], bags.offsets[items + 1]
        return torch.from_numpy(bags.values[_gather_rows(starts, ends)]), torch.from_numpy(ends - starts)

    def collate(self, indices: Sequence[int]) -> RankingBatch:
        w = self.windows
        idx = np.asarray(indices, dtype=np.int64)
        log = self.log
        hist_rows = _gather_rows(w.hist_start[idx], w.cand_start[idx])
        cand_rows = _gather_rows(w.cand_start[idx], w.cand_end[idx])
        users = log.users[w.seq[idx]]
        hist_bags, hist_bag_lengths = self._bags(hist_rows)
        cand_bags, cand_bag_lengths = self._bags(cand_rows)
        t = torch.from_numpy
        return RankingBatch(
            users=t(users.copy()),
            user_features=t(log.user_features.values[users]),
            history_lengths=t(w.cand_start[idx] - w.hist_start[idx]),
            history_items=t(log.items[hist_rows]),
            history_actions=t(log.actions[hist_rows]),
            history_timestamps=t(log.timestamps[hist_rows]),
            history_bag_values=hist_bags,
            history_bag_lengths=hist_bag_lengths,
            candidate_lengths=t(w.cand_end[idx] - w.cand_start[idx]),
            candidate_items=t(log.items[cand_rows]),
            candidate_timestamps=t(log.timestamps[cand_rows]),
            candidate_bag_values=cand_bags,
            candidate_bag_lengths=cand_bag_lengths,
            request_timestamps=t(log.timestamps[w.cand_start[idx]]),
            labels={name: t(col[cand_rows]) for name, col in log.labels.items()},
        )


def make_ranking_dataloader(dataset: RankingDataset, sampler: EpochBatchSampler) -> DataLoader:
    """Serves ``sampler``'s batches of ``dataset`` as RankingBatch (single process: batches are cheap)."""
    collate: Callable[[Sequence[int]], RankingBatch] = dataset.collate
    # A private generator keeps the DataLoader's base-seed draw off the global torch RNG (exact resume).
    generator = torch.Generator().manual_seed(sampler.seed)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, generator=generator)
