"""Ranking metrics from 0-based ranks of the target among all candidates."""

from __future__ import annotations

import torch


class RankingMetrics:
    """Accumulates target ranks; computes HR@k, NDCG@k (one relevant item: ``1/log2(rank + 2)``) and MRR.

    ``rank`` is the number of candidates scored strictly higher than the target (0 = top).
    """

    def __init__(self, hr_ks: tuple[int, ...] = (1, 10, 50, 200), ndcg_ks: tuple[int, ...] = (10, 50, 200)) -> None:
        if any(k < 1 for k in (*hr_ks, *ndcg_ks)):
            raise ValueError("metric cut-offs must be >= 1")
        self.hr_ks = tuple(hr_ks)
        self.ndcg_ks = tuple(ndcg_ks)
        self._ranks: list[torch.Tensor] = []

    def update(self, ranks: torch.Tensor) -> None:
        if ranks.dim() != 1:
            raise ValueError(f"ranks must be 1-D, got shape {tuple(ranks.shape)}")
        if ranks.numel() and int(ranks.min()) < 0:
            raise ValueError("ranks must be >= 0")
        self._ranks.append(ranks.detach().to("cpu", torch.int64))

    @property
    def count(self) -> int:
        return sum(r.numel() for r in self._ranks)

    def compute(self) -> dict[str, float]:
        if not self._ranks:
            raise ValueError("RankingMetrics.compute() called before any update()")
        ranks = torch.cat(self._ranks).to(torch.float64)
        out: dict[str, float] = {}
        for k in self.hr_ks:
            out[f"hr@{k}"] = float((ranks < k).to(torch.float64).mean())
        gains = 1.0 / torch.log2(ranks + 2.0)
        for k in self.ndcg_ks:
            out[f"ndcg@{k}"] = float(torch.where(ranks < k, gains, torch.zeros_like(gains)).mean())
        out["mrr"] = float((1.0 / (ranks + 1.0)).mean())
        return out
