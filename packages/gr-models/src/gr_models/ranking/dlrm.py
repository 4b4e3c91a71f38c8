"""Non-sequential DLRM-style baseline: user + candidate features, pairwise dot interaction, MLP; no history."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gr_models.data.ranking import RankingBatch
from gr_models.modules.input_embedding import DynamicItemTableConfig, ItemInputEmbedding
from gr_models.ranking.features import ItemBagEmbedding, RankingFeatureSpec, UserFeatureEmbedding
from gr_models.ranking.tasks import RankingTask, TaskHeads, check_tasks


@dataclass
class DLRMConfig:
    features: RankingFeatureSpec
    tasks: list[RankingTask]
    embedding_dim: int = 64
    hidden_dims: tuple[int, ...] = (256, 128)
    dropout: float = 0.2
    dynamic_item_table: DynamicItemTableConfig | None = None  # a gr-dynemb hash table for the item ids

    def __post_init__(self) -> None:
        check_tasks(self.tasks)
        if not self.hidden_dims or any(h < 1 for h in self.hidden_dims):
            raise ValueError(f"hidden_dims must be a non-empty list of positive widths, got {self.hidden_dims}")


def pairwise_dots(vectors: torch.Tensor) -> torch.Tensor:
    """``[N, S, D]`` -> the ``S (S - 1) / 2`` dot products of distinct pairs, ``[N, S (S - 1) / 2]`` (DLRM's
    interaction layer)."""
    s = vectors.shape[1]
    gram = torch.bmm(vectors, vectors.transpose(1, 2))
    i, j = torch.triu_indices(s, s, offset=1, device=vectors.device)
    return gram[:, i, j]


class DLRMRankingModel(nn.Module):
    """Per candidate: the user's feature embeddings, the candidate's item and bag embeddings -> their pairwise dot
    products concatenated with the embeddings -> MLP -> task outputs ``[T, num_tasks]``."""

    def __init__(self, config: DLRMConfig) -> None:
        super().__init__()
        self.config = config
        spec, d = config.features, config.embedding_dim
        # Same TorchRec item table as the sequential model (max_seq_len 1: no positions are used).
        self.item_embedding = ItemInputEmbedding(spec.num_items, d, 1, 0.0, dynamic=config.dynamic_item_table)
        self.user_embedding = UserFeatureEmbedding(spec, d)
        self.bag_embedding = ItemBagEmbedding(spec, d) if spec.item_bag_size > 0 else None
        slots = spec.num_user_features + 1 + (self.bag_embedding is not None)
        in_dim = slots * d + slots * (slots - 1) // 2
        layers: list[nn.Module] = []
        for width in config.hidden_dims[:-1]:
            layers += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(config.dropout)]
            in_dim = width
        self.mlp = nn.Sequential(*layers)
        self.heads = TaskHeads(in_dim, config.hidden_dims[-1], config.tasks, config.dropout)

    def forward(self, batch: RankingBatch) -> torch.Tensor:
        user = self.user_embedding(batch.user_features)  # [B, F, D]
        user = torch.repeat_interleave(user, batch.candidate_lengths, dim=0)  # [T, F, D]
        slots = [user, self.item_embedding.embed_ids(batch.candidate_items).unsqueeze(1)]
        if self.bag_embedding is not None:
            slots.append(self.bag_embedding(batch.candidate_bag_values, batch.candidate_bag_lengths).unsqueeze(1))
        vectors = torch.cat(slots, dim=1)
        x = torch.cat([vectors.flatten(1), pairwise_dots(vectors)], dim=1)
        return self.heads(self.mlp(x))
