"""Item-id input embeddings held in a TorchRec EmbeddingCollection."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

from gr_models.jagged import positions_in_sequence


@dataclass
class DynamicItemTableConfig:
    """The item table as a gr-dynemb hash table (``pip install 'gr-models[dynemb]'``) instead of a static one.

    Ids need not be dense: any int64 id gets a row on first sight (from a seeded truncated normal with the static
    table's std, the same for the same id on any run). The table trains with its own fused optimizer inside
    backward (the model's torch optimizer never sees it), one step per lookup call: ``RetrievalModel.training_forward``
    looks the inputs, the targets and any pre-drawn negatives up in one call, so a training step takes one; looking
    the table up again in the same step (``model(batch)`` then ``model.item_embeddings(ids)``) takes one more step
    per call. At evaluation ids are only found, never inserted; unseen ids read their initializer row.
    """

    capacity: int = 1 << 16  # rows reserved up front; grows by doubling
    max_capacity: int = 1 << 24
    policy: Literal["none", "lru", "lfu"] = "lru"  # eviction when a bucket is full ("none": error instead)
    optimizer: Literal["sgd", "adagrad", "rowwise_adagrad", "adam"] = "adam"
    lr: float | None = None  # None: 1e-3 (the retrieval trainer sets its train.lr)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    admit_after: int = 0  # training batches an id must appear in before it gets a row; 0 = at once
    seed: int = 0  # initializer seed

    def __post_init__(self) -> None:
        if self.policy not in ("none", "lru", "lfu"):
            raise ValueError(f"dynamic item table policy must be none, lru or lfu, got {self.policy!r}")
        if not 0 < self.capacity <= self.max_capacity:
            raise ValueError(f"need 0 < capacity <= max_capacity, got {self.capacity}, {self.max_capacity}")


def dynamic_item_collection(
    config: DynamicItemTableConfig, table_name: str, feature_name: str, embedding_dim: int, init_std: float
) -> nn.Module:
    """A gr-dynemb ``DynamicEmbeddingCollection`` (same KJT -> dict interface as TorchRec's) of one item table."""
    try:
        import gr_dynemb
    except ImportError as exc:
        raise ImportError(
            "the dynamic item table needs gr-dynemb, which is not installed: pip install 'gr-models[dynemb]' "
            "(or set the item table back to static)"
        ) from exc
    initializer = gr_dynemb.InitializerConfig("truncated_normal", std=init_std, seed=config.seed)
    table = gr_dynemb.DynamicTableConfig(
        dim=embedding_dim,
        capacity=config.capacity,
        max_capacity=config.max_capacity,
        policy=config.policy,
        initializer=initializer,
    )
    optimizer = gr_dynemb.FusedOptimizerConfig(
        config.optimizer,
        lr=1e-3 if config.lr is None else config.lr,
        eps=config.eps,
        beta1=config.beta1,
        beta2=config.beta2,
    )
    embedding = gr_dynemb.DynamicEmbeddingConfig(
        table, optimizer, admit_after=config.admit_after, eval_missing="initializer"
    )
    return gr_dynemb.DynamicEmbeddingCollection([gr_dynemb.DynamicTable(table_name, [feature_name], embedding)])


class ItemInputEmbedding(nn.Module):
    """Item embedding x sqrt(D) + learnable positional embedding, then dropout (HSTU/SASRec input layer).

    The item table lives in a TorchRec ``EmbeddingCollection`` (fed by a ``KeyedJaggedTensor``) so that later
    stages can shard it; ``dynamic`` swaps in a gr-dynemb hash table with the same interface (see
    ``DynamicItemTableConfig``) without touching the encoder.
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
        dynamic: DynamicItemTableConfig | None = None,
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

        self.dynamic = dynamic is not None
        self.item_embeddings: nn.Module
        if dynamic is not None:
            self.item_embeddings = dynamic_item_collection(dynamic, table_name, feature_name, embedding_dim, init_std)
        else:

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
        return self.lookup(self._one_entry_per_id(item_ids.reshape(-1))).reshape(*item_ids.shape, self.embedding_dim)

    def with_ids(self, features: KeyedJaggedTensor, ids: torch.Tensor) -> KeyedJaggedTensor:
        """One KJT of the item feature holding the input items and then the ids of ``ids`` (any shape, flattened;
        e.g. the targets, then sampled negatives), ONE ENTRY PER ID: what ``forward_with_ids`` looks up in a single
        call of the table. The sequences' boundaries are not in it (the batch's ``seq_offsets`` carry them): FBGEMM's
        unpooled lookup gives each entry one warp that walks its ids in turn, so an entry of a whole 4096-item
        sequence serialises its rows (on an H200, 131k ids in 64 entries took 13 ms:
        ``tools/bench_embedding_lookup.py``)."""
        if features.keys() != [self.feature_name]:
            raise ValueError(
                f"input features must hold exactly the item feature {self.feature_name!r}, got {features.keys()}"
            )
        values = torch.cat([features.values(), ids.reshape(-1).to(features.values().dtype)])
        return self._one_entry_per_id(values, features.lengths().dtype)

    def _one_entry_per_id(self, values: torch.Tensor, lengths_dtype: torch.dtype = torch.int64) -> KeyedJaggedTensor:
        """A KJT of the item feature with one entry per id of ``values`` (1-D)."""
        n = values.numel()  # per-key length given: TorchRec would otherwise read it back from the device (a sync)
        lengths = torch.ones(n, dtype=lengths_dtype, device=values.device)
        return KeyedJaggedTensor(
            keys=[self.feature_name], values=values, lengths=lengths, length_per_key=[n], offset_per_key=[0, n]
        )

    def forward_with_ids(
        self,
        features: KeyedJaggedTensor,
        seq_offsets: torch.Tensor,
        max_seq_len: int,
        num_ids: int,
        num_inputs: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training form of ``forward``: ``features`` from ``with_ids`` (inputs, then ``num_ids`` ids), looked up in
        ONE call of the table, so a fused table optimizer takes one step for all of them. ``num_inputs``: the
        batch's input item count (``batch.features.values().numel()``, a host number), checked when given. Returns
        ``(x, item_emb, id_emb)``, the last ``[num_ids, D]`` raw embeddings of the ids."""
        self._check_length(max_seq_len)
        entries, ids = features.lengths().numel(), features.values().numel()
        inputs = ids - num_ids
        if entries != ids or inputs < 0 or (num_inputs is not None and inputs != num_inputs):
            raise ValueError(
                f"features hold {ids} ids in {entries} entries, not the batch's {num_inputs} inputs plus {num_ids} "
                "ids, one entry each: build them with with_ids(batch features, ids)"
            )
        rows = self.lookup(features)
        item_emb, id_emb = rows.split([rows.size(0) - num_ids, num_ids])
        return self._input(item_emb, seq_offsets), item_emb, id_emb

    def forward(
        self, features: KeyedJaggedTensor, seq_offsets: torch.Tensor, max_seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(x, item_emb)``: encoder input ``[total, D]`` and the raw item embeddings ``[total, D]``.

        ``max_seq_len`` is the batch's longest sequence (a host int, so no device sync is needed to check it).
        """
        self._check_length(max_seq_len)
        item_emb = self.lookup(features)
        return self._input(item_emb, seq_offsets), item_emb

    def _check_length(self, max_seq_len: int) -> None:
        if max_seq_len > self.max_seq_len:
            raise ValueError(
                f"batch holds a sequence of length {max_seq_len}, longer than the positional table "
                f"(max_seq_len={self.max_seq_len}); truncate inputs to max_seq_len in the data pipeline"
            )

    def _input(self, item_emb: torch.Tensor, seq_offsets: torch.Tensor) -> torch.Tensor:
        """Encoder input: item embeddings x sqrt(D) + positions, dropout."""
        positions = positions_in_sequence(seq_offsets, item_emb.size(0))
        x = item_emb * math.sqrt(self.embedding_dim) + self.position_embeddings(positions)
        return self.dropout(x)
