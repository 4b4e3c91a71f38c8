"""Full-ranking evaluation: score every item, drop the user's history, rank the held-out target."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from gr_models.data.batching import SequenceBatch
from gr_models.jagged import last_in_sequence
from gr_models.retrieval.metrics import RankingMetrics


def target_ranks(
    scores: torch.Tensor,
    targets: torch.Tensor,
    history_offsets: torch.Tensor | None,
    history_items: torch.Tensor | None,
) -> torch.Tensor:
    """0-based rank of each target among all items after removing the user's history items from the ranking.

    ``scores``: ``[B, num_items]``. A history item that equals the target (a re-consumption) is not removed.
    """
    scores = scores.clone()
    target_scores = scores.gather(1, targets.unsqueeze(1))
    if history_items is not None and history_items.numel():
        assert history_offsets is not None
        rows = torch.repeat_interleave(
            torch.arange(scores.size(0), device=scores.device),
            history_offsets[1:] - history_offsets[:-1],
            output_size=history_items.numel(),
        )
        scores[rows, history_items] = float("-inf")
        scores.scatter_(1, targets.unsqueeze(1), target_scores)
    return (scores > target_scores).sum(dim=1)


@torch.no_grad()
def evaluate_retrieval(
    model: torch.nn.Module,
    batches: Iterable[SequenceBatch],
    *,
    device: torch.device | str = "cpu",
    metrics: RankingMetrics | None = None,
) -> dict[str, float]:
    """Evaluates a ``RetrievalModel`` on evaluation batches (one held-out target per sequence)."""
    was_training = model.training
    model.eval()
    metrics = metrics or RankingMetrics()
    try:
        items = model.all_item_embeddings()
        for batch in batches:
            batch = batch.to(device)
            if batch.history_offsets is None:
                raise ValueError("evaluate_retrieval needs evaluation batches (with history_offsets/history_items)")
            queries = last_in_sequence(model(batch), batch.seq_offsets)
            ranks = target_ranks(queries @ items.T, batch.target_items, batch.history_offsets, batch.history_items)
            metrics.update(ranks)
    finally:
        model.train(was_training)
    return metrics.compute()
