"""Next-item retrieval model: item input embeddings -> sequence encoder -> L2-normalised query embeddings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from gr_models.data.batching import SequenceBatch
from gr_models.jagged import query_timestamps
from gr_models.modules.hstu import HSTUConfig, HSTUEncoder
from gr_models.modules.input_embedding import DynamicItemTableConfig, ItemInputEmbedding
from gr_models.modules.l2_norm import l2_normalize
from gr_models.modules.sasrec import SASRecConfig, SASRecEncoder
from gr_models.modules.triton_rows import compute_dtype


@dataclass
class RetrievalModelConfig:
    """Which encoder and how large. ``embedding_dim``, ``max_seq_len`` and ``dropout`` are copied into the
    encoder config so the two never disagree."""

    num_items: int
    encoder: Literal["hstu", "sasrec"] = "hstu"
    embedding_dim: int = 50
    max_seq_len: int = 200
    dropout: float = 0.2
    position_init_std: float | None = None  # None: the item embeddings' std (0.02)
    hstu: HSTUConfig = field(default_factory=HSTUConfig)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    # "dynamic": the item table is a gr-dynemb hash table (needs gr-models[dynemb]), set up by dynamic_item_table.
    item_table: Literal["static", "dynamic"] = "static"
    dynamic_item_table: DynamicItemTableConfig = field(default_factory=DynamicItemTableConfig)

    def __post_init__(self) -> None:
        if self.encoder not in ("hstu", "sasrec"):
            raise ValueError(f"encoder must be 'hstu' or 'sasrec', got {self.encoder!r}")
        if self.item_table not in ("static", "dynamic"):
            raise ValueError(f"item_table must be 'static' or 'dynamic', got {self.item_table!r}")
        for sub in (self.hstu, self.sasrec):
            sub.embedding_dim = self.embedding_dim
            sub.max_seq_len = self.max_seq_len
            sub.dropout = self.dropout
            sub.__post_init__()


class TrainingEmbeddings(NamedTuple):
    """What ``RetrievalModel.training_forward`` returns, all L2-normalised."""

    queries: torch.Tensor  # [N, D], one per input position
    targets: torch.Tensor  # [N, D], the target items' embeddings
    negatives: torch.Tensor | None  # [N, K, D] when negative ids were passed, else None


def request_timestamps(batch: SequenceBatch) -> torch.Tensor:
    """Per sequence, the time the next item is predicted for: ``[B]``."""
    if batch.history_offsets is not None:  # evaluation batch: one target per sequence
        return batch.target_timestamps
    return batch.target_timestamps[batch.seq_offsets[1:] - 1]


class RetrievalModel(nn.Module):
    def __init__(self, config: RetrievalModelConfig) -> None:
        super().__init__()
        self.config = config
        self.input_embedding = ItemInputEmbedding(
            config.num_items,
            config.embedding_dim,
            config.max_seq_len,
            config.dropout,
            position_init_std=config.position_init_std,
            dynamic=config.dynamic_item_table if config.item_table == "dynamic" else None,
        )
        self.encoder: nn.Module = HSTUEncoder(config.hstu) if config.encoder == "hstu" else SASRecEncoder(config.sasrec)

    def forward(self, batch: SequenceBatch) -> torch.Tensor:
        """L2-normalised query embedding of every input position: ``[total, D]``."""
        x, _ = self.input_embedding(batch.features, batch.seq_offsets, batch.max_seq_len)
        return self._queries(x, batch)

    def training_features(self, batch: SequenceBatch, negatives: torch.Tensor | None = None) -> KeyedJaggedTensor:
        """The one KJT ``training_forward`` looks up: the batch's input items, its target items, then the
        ``negatives`` ids (``[N, K]``, e.g. ``SampledSoftmaxLoss.sample_negatives``) when given. A train pipeline
        that prefetches the table's input dist (``gr_parallel.TrainPipeline``'s ``sparse_features``) hands this
        object to ``training_forward``."""
        if batch.is_eval:
            raise ValueError("training_features needs a training batch (one target per input position)")
        targets = batch.target_items
        if negatives is None:
            return self.input_embedding.with_ids(batch.features, targets)
        if negatives.dim() != 2 or negatives.size(0) != targets.numel():
            raise ValueError(
                f"negatives must be [{targets.numel()}, K] (one row per target), got {tuple(negatives.shape)}"
            )
        return self.input_embedding.with_ids(batch.features, torch.cat([targets, negatives.reshape(-1)]))

    def training_forward(
        self,
        batch: SequenceBatch,
        features: KeyedJaggedTensor | None = None,
        negatives: torch.Tensor | None = None,
    ) -> TrainingEmbeddings:
        """Queries and the embeddings the loss needs from ONE lookup of the item table: the inputs, the targets
        and, when ``negatives`` (``[N, K]`` ids) is given, the negatives (``features``: ``training_features(batch,
        negatives)``, built here when None). All L2-normalised; equal to ``self(batch)``,
        ``self.item_embeddings(targets)`` and ``self.item_embeddings(negatives)``, but a fused table optimizer takes
        one step per training step instead of one per lookup, and a sharded table runs one input and one output
        all-to-all. Feed them to ``SampledSoftmaxLoss(..., target_embeddings=..., negatives=...,
        negative_embeddings=...)``; in-batch negatives need no ``negatives`` here (they are target rows).

        Under autocast they come in its dtype (bf16), the dtype the loss's matmuls and gathers read them in, written
        so by the normalisation itself (the gradients still reach the fp32 encoder output and rows in fp32)."""
        if features is None:
            features = self.training_features(batch, negatives)
        n = batch.target_items.numel()
        k = 0 if negatives is None else negatives.size(1)
        x, _, rows = self.input_embedding.forward_with_ids(
            features, batch.seq_offsets, batch.max_seq_len, n * (1 + k), batch.features.values().numel()
        )
        rows = l2_normalize(rows, out_dtype=compute_dtype(rows, rows.dtype))  # autocast's, else the rows' own
        target_emb, negative_emb = rows.split([n, n * k])
        queries = self._queries(x, batch, in_compute_dtype=True)
        return TrainingEmbeddings(queries, target_emb, None if negatives is None else negative_emb.view(n, k, -1))

    def _queries(self, x: torch.Tensor, batch: SequenceBatch, in_compute_dtype: bool = False) -> torch.Tensor:
        q_ts = query_timestamps(batch.timestamps, batch.seq_offsets, request_timestamps(batch))
        h = self.encoder(
            x, batch.seq_offsets, batch.max_seq_len, batch.timestamps, q_ts, validate=not batch.offsets_checked
        )
        return l2_normalize(h, out_dtype=compute_dtype(h, h.dtype) if in_compute_dtype else None)

    def item_embeddings(self, item_ids: torch.Tensor) -> torch.Tensor:
        """L2-normalised output-side item embeddings (shared with the input table), any id shape."""
        return l2_normalize(self.input_embedding.embed_ids(item_ids))

    def all_item_embeddings(self) -> torch.Tensor:
        device = self.input_embedding.position_embeddings.weight.device
        return self.item_embeddings(torch.arange(self.config.num_items, device=device))


def build_retrieval_model(config: RetrievalModelConfig) -> RetrievalModel:
    return RetrievalModel(config)
