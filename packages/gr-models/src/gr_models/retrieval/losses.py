"""Sampled softmax for next-item prediction: the positive against K negatives, cosine logits / temperature."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class SampledSoftmaxLoss(nn.Module):
    """``-log softmax([s(q, pos), s(q, neg_1..K)])[0]`` averaged over positions, ``s = <q, e> / temperature``.

    Negatives per position are drawn from the torch default generator (so seeding and checkpointed RNG state make
    runs reproducible):

    - ``"uniform"``: uniformly over the whole catalogue (the HSTU paper's choice);
    - ``"in_batch"``: uniformly over the target items of the current batch, i.e. proportional to in-batch
      popularity (cheap, harder negatives; no logQ correction).

    A negative equal to the position's positive is masked out (an "accidental hit"), never counted as negative.
    """

    def __init__(
        self,
        num_items: int,
        num_negatives: int = 128,
        temperature: float = 0.05,
        negatives: Literal["uniform", "in_batch"] = "uniform",
    ) -> None:
        super().__init__()
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if negatives not in ("uniform", "in_batch"):
            raise ValueError(f"negatives must be 'uniform' or 'in_batch', got {negatives!r}")
        self.num_items = num_items
        self.num_negatives = num_negatives
        self.temperature = temperature
        self.negatives = negatives

    def sample_negatives(self, targets: torch.Tensor) -> torch.Tensor:
        shape = (targets.numel(), self.num_negatives)
        if self.negatives == "uniform":
            return torch.randint(self.num_items, shape).to(targets.device)
        return targets[torch.randint(targets.numel(), shape).to(targets.device)]

    def forward(
        self,
        queries: torch.Tensor,
        targets: torch.Tensor,
        item_embeddings: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """``queries``: normalised ``[N, D]``; ``targets``: item ids ``[N]``; ``item_embeddings``: ids -> normalised
        embeddings (any shape)."""
        if targets.numel() == 0:
            raise ValueError("SampledSoftmaxLoss got an empty batch (no target positions)")
        negatives = self.sample_negatives(targets)
        pos_logits = (queries * item_embeddings(targets)).sum(-1, keepdim=True)
        d = queries.size(-1)
        if self.num_items <= self.num_negatives * d:
            # Small catalogue: scoring every item once and gathering is cheaper than gathering [N, K, D] rows.
            all_logits = queries @ item_embeddings(torch.arange(self.num_items, device=targets.device)).T
            neg_logits = all_logits.gather(1, negatives)
        else:
            neg_logits = torch.einsum("nd,nkd->nk", queries, item_embeddings(negatives))
        neg_logits = neg_logits.masked_fill(negatives == targets.unsqueeze(1), float("-inf"))
        logits = torch.cat([pos_logits, neg_logits], dim=1) / self.temperature
        return F.cross_entropy(logits, torch.zeros_like(targets))
