"""Item-id input embeddings held in a TorchRec EmbeddingCollection."""

from __future__ import annotations

import math

import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

from gr_models.jagged import positions_in_sequence


class ItemInputEmbedding(nn.Module):
    """Item embedding x sqrt(D) + learnable positional embedding, then dropout (HSTU/SASRec input layer).

    The item table lives in a TorchRec ``EmbeddingCollection`` (fed by a ``KeyedJaggedTensor``) so that later
    stages can shard it or swap in a dynamic table without touching the encoder.
    """

    def __init__(
        self,
        num_items: int,
        embedding_dim: int,
        max_seq_len: int,
        dropout: float,
        *,
        feature_name: str = "item",
        table_name: str = "item_table",
        init_std: float = 0.02,
        position_init_std: float | None = None,
    ) -> None:
        super().__init__()
        if num_items <= 0 or embedding_dim <= 0 or max_seq_len <= 0:
            raise ValueError(
                f"num_items, embedding_dim and max_seq_len must be positive, got {num_items}, {embedding_dim}, "
                f"{max_seq_len}"
            )
        self.num_items = num_items
        self.embedding_dim = embedding_dim
        self.max_seq_len = max_seq_len
        self.feature_name = feature_name
        self.table_name = table_name

        def init_table(weight: torch.Tensor) -> torch.Tensor:
            return nn.init.trunc_normal_(weight, std=init_std, a=-2 * init_std, b=2 * init_std)

        self.item_embeddings = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    name=table_name,
                    embedding_dim=embedding_dim,
                    num_embeddings=num_items,
                    feature_names=[feature_name],
                    init_fn=init_table,
                )
            ],
            device=torch.device("cpu"),
        )
        self.position_embeddings = nn.Embedding(max_seq_len, embedding_dim)
        # Positions default to the item init; the HSTU reference design uses sqrt(1/D), i.e. the same scale as the
        # sqrt(D)-scaled item embeddings they are added to.
        pos_std = init_std if position_init_std is None else position_init_std
        nn.init.trunc_normal_(self.position_embeddings.weight, std=pos_std, a=-2 * pos_std, b=2 * pos_std)
        self.dropout = nn.Dropout(dropout)

    def lookup(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Raw item embeddings ``[total, D]`` of the KJT's item feature (no scaling, no positions)."""
        return self.item_embeddings(features)[self.feature_name].values()

    def embed_ids(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of arbitrary item ids (any shape) through the same table, e.g. targets and negatives."""
        flat = item_ids.reshape(-1)
        kjt = KeyedJaggedTensor(
            keys=[self.feature_name],
            values=flat,
            lengths=torch.ones(flat.numel(), dtype=torch.int64, device=flat.device),
        )
        return self.lookup(kjt).reshape(*item_ids.shape, self.embedding_dim)

    def forward(
        self, features: KeyedJaggedTensor, seq_offsets: torch.Tensor, max_seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(x, item_emb)``: encoder input ``[total, D]`` and the raw item embeddings ``[total, D]``.

        ``max_seq_len`` is the batch's longest sequence (a host int, so no device sync is needed to check it).
        """
        if max_seq_len > self.max_seq_len:
            raise ValueError(
                f"batch holds a sequence of length {max_seq_len}, longer than the positional table "
                f"(max_seq_len={self.max_seq_len}); truncate inputs to max_seq_len in the data pipeline"
            )
        item_emb = self.lookup(features)
        positions = positions_in_sequence(seq_offsets, item_emb.size(0))
        x = item_emb * math.sqrt(self.embedding_dim) + self.position_embeddings(positions)
        return self.dropout(x), item_emb
