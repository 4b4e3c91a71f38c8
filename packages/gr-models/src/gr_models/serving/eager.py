"""Full recompute of several users in one forward of the plain model (cross-user compute batching).

``BatchedModelScorer`` packs the windows ``[features | history | candidates]`` of several users into one jagged
``RankingBatch`` and runs the model's own forward (through ``CastRankingModel``) once: the batcher's groups then
share one encoder pass instead of one per request. Sequences are independent in the jagged attention, so each
user's scores equal a forward of that user alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gr_models.data.ranking import RankingBatch
from gr_models.inference.cast_model import CastRankingModel
from gr_models.inference.requests import Candidates, UserEvents
from gr_models.ranking.hstu_ranking import HSTURankingModel

Window = tuple[torch.Tensor, UserEvents, Candidates, int]  # features, history, candidates, request time


def ranking_batch(windows: Sequence[Window]) -> RankingBatch:
    """One jagged batch of the windows (candidates without timestamps are timed at their request time)."""
    feats, hists, cands, times = zip(*windows, strict=True)
    cand_t = [
        torch.full((len(c),), t, dtype=torch.int64) if c.timestamps is None else c.timestamps
        for c, t in zip(cands, times, strict=True)
    ]
    return RankingBatch(
        users=torch.arange(len(windows)),
        user_features=torch.stack([torch.as_tensor(f, dtype=torch.int64) for f in feats]),
        history_lengths=torch.tensor([len(h) for h in hists], dtype=torch.int64),
        history_items=torch.cat([h.items for h in hists]),
        history_actions=torch.cat([h.actions for h in hists]),
        history_timestamps=torch.cat([h.timestamps for h in hists]),
        history_bag_values=torch.cat([h.bag_values for h in hists]),
        history_bag_lengths=torch.cat([h.bag_lengths for h in hists]),
        candidate_lengths=torch.tensor([len(c) for c in cands], dtype=torch.int64),
        candidate_items=torch.cat([c.items for c in cands]),
        candidate_timestamps=torch.cat(cand_t),
        candidate_bag_values=torch.cat([c.bag_values for c in cands]),
        candidate_bag_lengths=torch.cat([c.bag_lengths for c in cands]),
        request_timestamps=torch.tensor(times, dtype=torch.int64),
        labels={},
    )


class BatchedModelScorer:
    """``scorer(windows) -> [scores of window i: [M_i, num_tasks]]`` with one model forward; ``scorer(f, h, c, t)``
    scores a single window (the ``UncachedBackend`` score function)."""

    def __init__(self, model: HSTURankingModel, dtype: str | torch.dtype = torch.float32) -> None:
        self.cast = CastRankingModel(model.eval(), dtype)

    def many(self, windows: Sequence[Window]) -> list[torch.Tensor]:
        batch = ranking_batch(windows)
        out = self.cast(batch)
        return list(out.split(batch.candidate_lengths.tolist()))

    def __call__(self, features: torch.Tensor, history: UserEvents, candidates: Candidates, t: int) -> torch.Tensor:
        return self.many([(features, history, candidates, t)])[0]
