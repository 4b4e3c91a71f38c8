"""What a ranking model reads from the data (the feature schema) and the embedding tables both models share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    PoolingType,
)

from gr_models.data.ranking import RankingLog


@dataclass(frozen=True)
class RankingFeatureSpec:
    """Vocabulary sizes of the ranking features: item ids, history action ids, categorical user features (the
    contextual prefix) and the items' multi-hot bag (genres / tags; ``item_bag_size = 0``: none)."""

    num_items: int
    num_actions: int
    user_feature_names: tuple[str, ...]
    user_feature_sizes: tuple[int, ...]
    item_bag_name: str = "genre"
    item_bag_size: int = 0

    def __post_init__(self) -> None:
        if self.num_items < 1 or self.num_actions < 1:
            raise ValueError(f"num_items and num_actions must be >= 1, got {self.num_items}, {self.num_actions}")
        if len(self.user_feature_names) != len(self.user_feature_sizes):
            raise ValueError("user_feature_names and user_feature_sizes differ in length")
        if any(s < 1 for s in self.user_feature_sizes):
            raise ValueError(f"user feature sizes must be >= 1, got {self.user_feature_sizes}")

    @property
    def num_user_features(self) -> int:
        return len(self.user_feature_names)

    @classmethod
    def of_log(cls, log: RankingLog) -> RankingFeatureSpec:
        bags = log.item_bags
        return cls(
            num_items=log.num_items,
            num_actions=log.num_actions,
            user_feature_names=tuple(log.user_features.names),
            user_feature_sizes=tuple(log.user_features.cardinalities),
            item_bag_name=bags.name if bags is not None else "genre",
            item_bag_size=bags.cardinality if bags is not None else 0,
        )


def _init(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def init(weight: torch.Tensor) -> torch.Tensor:
        return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)

    return init


class UserFeatureEmbedding(nn.Module):
    """Categorical user features ``[B, F]`` -> ``[B, F, D]`` through a TorchRec EmbeddingCollection (one table per
    feature, so they can be sharded or made dynamic like the item table)."""

    def __init__(self, spec: RankingFeatureSpec, embedding_dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.names = list(spec.user_feature_names)
        self.embedding_dim = embedding_dim
        self.tables = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    name=f"user_{name}_table",
                    embedding_dim=embedding_dim,
                    num_embeddings=size,
                    feature_names=[f"user_{name}"],
                    init_fn=_init(init_std),
                )
                for name, size in zip(spec.user_feature_names, spec.user_feature_sizes, strict=True)
            ],
            device=torch.device("cpu"),
        )

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        b, f = values.shape
        if f != len(self.names):
            raise ValueError(f"user_features has {f} columns, the model was built for {len(self.names)}: {self.names}")
        # Per-key lengths and offsets are known here; without them TorchRec reads them back from the device (a sync).
        kjt = KeyedJaggedTensor(
            keys=[f"user_{n}" for n in self.names],
            values=values.t().reshape(-1),
            lengths=torch.ones(b * f, dtype=torch.int64, device=values.device),
            length_per_key=[b] * f,
            offset_per_key=[i * b for i in range(f + 1)],
        )
        out = self.tables(kjt)
        return torch.stack([out[f"user_{n}"].values() for n in self.names], dim=1)


class ItemBagEmbedding(nn.Module):
    """Mean-pooled embedding of each token's item bag (genres) through a TorchRec EmbeddingBagCollection;
    an empty bag gives zeros."""

    def __init__(self, spec: RankingFeatureSpec, embedding_dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.key = spec.item_bag_name
        self.bags = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=f"{self.key}_table",
                    embedding_dim=embedding_dim,
                    num_embeddings=spec.item_bag_size,
                    feature_names=[self.key],
                    pooling=PoolingType.MEAN,
                    init_fn=_init(init_std),
                )
            ],
            device=torch.device("cpu"),
        )

    def forward(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        n = values.numel()  # one key: its length is every value (given, so TorchRec need not read it back)
        kjt = KeyedJaggedTensor(
            keys=[self.key], values=values, lengths=lengths, length_per_key=[n], offset_per_key=[0, n]
        )
        return self.bags(kjt)[self.key]
