"""HSTU ranking: [user features | history items with actions | candidates] in one jagged sequence, one pass.

Sequence of window ``b`` (``F`` user features, ``h`` history events, ``k`` candidates):

- ``F`` contextual tokens (one per categorical user feature), a prefix every token sees (``contextual_seq_len``);
- the history: ``action_mode="add"``: one token per event, ``item + bag + action`` embeddings; ``"interleave"``:
  two tokens per event, ``item + bag`` then ``action`` (causal, so an item token never sees its own action);
- ``k`` candidate tokens (``item + bag``, no action) marked as targets through the attention op's
  ``num_targets``: each sees the context, the whole history and itself, never another candidate. All candidates
  share one position (for the positional embedding and the relative bias), so their order is irrelevant.

The candidate outputs go through the multi-task heads: ``[total candidates, num_tasks]``.

``context_attention`` places the user features: ``"full"`` (default) makes them the op's contextual prefix, whose
rows see the whole history, with the request time as their key and query time; ``"causal"`` makes them an ordinary
causal prefix (``contextual_seq_len=0``) timed at the user's first history event (the request time when there is
none). With "causal" no token's output depends on later events or on the request time except the last history token
(whose query time is the request time), which lets ``gr_models.inference`` append events incrementally and exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from gr_models.data.ranking import RankingBatch
from gr_models.jagged import lengths_to_offsets, positions_in_sequence, query_timestamps
from gr_models.modules.hstu import HSTUConfig, HSTUEncoder
from gr_models.modules.input_embedding import DynamicItemTableConfig, ItemInputEmbedding
from gr_models.ranking.features import ItemBagEmbedding, RankingFeatureSpec, UserFeatureEmbedding
from gr_models.ranking.tasks import RankingTask, TaskHeads, check_tasks


@dataclass
class HSTURankingConfig:
    """``max_seq_len`` bounds ``F + (1 or 2) * history + candidates`` of a window; ``embedding_dim``,
    ``max_seq_len`` and ``dropout`` are copied into ``hstu``."""

    features: RankingFeatureSpec
    tasks: list[RankingTask]
    action_mode: Literal["add", "interleave"] = "add"
    embedding_dim: int = 64
    max_seq_len: int = 256
    dropout: float = 0.2
    head_hidden: int = 128
    hstu: HSTUConfig = field(default_factory=HSTUConfig)
    dynamic_item_table: DynamicItemTableConfig | None = None  # a gr-dynemb hash table for the item ids
    context_attention: Literal["full", "causal"] = "full"

    def __post_init__(self) -> None:
        if self.action_mode not in ("add", "interleave"):
            raise ValueError(f"action_mode must be 'add' or 'interleave', got {self.action_mode!r}")
        if self.context_attention not in ("full", "causal"):
            raise ValueError(f"context_attention must be 'full' or 'causal', got {self.context_attention!r}")
        check_tasks(self.tasks)
        self.hstu.embedding_dim = self.embedding_dim
        self.hstu.max_seq_len = self.max_seq_len
        self.hstu.dropout = self.dropout
        self.hstu.__post_init__()

    @property
    def tokens_per_event(self) -> int:
        return 2 if self.action_mode == "interleave" else 1


@dataclass
class RankingTokens:
    """Encoder inputs of a ranking batch, in row order (sequence ``b`` is rows ``offsets[b]:offsets[b + 1]``)."""

    x: torch.Tensor  # [total, D]: scaled embeddings + positional embeddings (dropout applied)
    offsets: torch.Tensor  # [B + 1]
    max_len: int  # longest window
    positions: torch.Tensor  # [total]: position of each token (all candidates of a window share one)
    timestamps: torch.Tensor  # [total]: key time of each token (relative time bias)
    query_timestamps: torch.Tensor  # [total]: time each row predicts at
    candidate_rows: torch.Tensor  # [T]: row of every candidate
    num_targets: torch.Tensor  # [B]: candidates per window (the attention op's targets)


class HSTURankingModel(nn.Module):
    def __init__(self, config: HSTURankingConfig) -> None:
        super().__init__()
        self.config = config
        spec, d = config.features, config.embedding_dim
        # The item table and the positional table are the retrieval model's input layer (TorchRec
        # EmbeddingCollection for items), reused as is.
        self.input_embedding = ItemInputEmbedding(
            spec.num_items, d, config.max_seq_len, config.dropout, dynamic=config.dynamic_item_table
        )
        self.user_embedding = UserFeatureEmbedding(spec, d)
        self.bag_embedding = ItemBagEmbedding(spec, d) if spec.item_bag_size > 0 else None
        self.action_embedding = nn.Embedding(spec.num_actions, d)
        nn.init.trunc_normal_(self.action_embedding.weight, std=0.02, a=-0.04, b=0.04)
        self.encoder = HSTUEncoder(config.hstu)
        self.heads = TaskHeads(d, config.head_hidden, config.tasks, config.dropout)

    def _items(self, batch: RankingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Item id (+ bag) embeddings of the history events and of the candidates. One lookup per table: a
        dynamic item table takes one optimizer step per lookup call."""
        h = batch.history_items.numel()
        emb = self.input_embedding.embed_ids(torch.cat([batch.history_items, batch.candidate_items]))
        if self.bag_embedding is not None:
            emb = emb + self.bag_embedding(
                torch.cat([batch.history_bag_values, batch.candidate_bag_values]),
                torch.cat([batch.history_bag_lengths, batch.candidate_bag_lengths]),
            )
        return emb[:h], emb[h:]

    @property
    def contextual_seq_len(self) -> int:
        """The attention op's fully visible prefix: the user features with ``context_attention="full"``, else 0."""
        return self.config.features.num_user_features if self.config.context_attention == "full" else 0

    def input_tokens(self, batch: RankingBatch, *, check_max_len: bool = True) -> RankingTokens:
        """The encoder inputs of a batch (embeddings, positions, key and query times, jagged layout).

        ``check_max_len=False`` lets the windows exceed ``max_seq_len`` (the cached scorer embeds all candidates of
        a request at once but runs them in micro-batches that fit)."""
        cfg = self.config
        device = batch.history_items.device
        b = len(batch)
        f = cfg.features.num_user_features
        m = cfg.tokens_per_event
        h_len, k_len = batch.history_lengths, batch.candidate_lengths
        lengths = f + m * h_len + k_len
        offsets = lengths_to_offsets(lengths)
        max_len = f + m * int(h_len.max()) + int(k_len.max()) if b else 1
        if check_max_len and max_len > cfg.max_seq_len:
            raise ValueError(
                f"a window needs {max_len} tokens ({f} user features + {m} x history + candidates) but "
                f"max_seq_len={cfg.max_seq_len}; raise model.max_seq_len or lower data.max_history"
            )
        starts = offsets[:-1]
        h_off = lengths_to_offsets(h_len)

        ctx_pos = torch.arange(f, device=device).repeat(b)
        ctx_dst = torch.repeat_interleave(starts, f) + ctx_pos
        if cfg.context_attention == "full":
            ctx_t = torch.repeat_interleave(batch.request_timestamps, f)
        else:  # the first event's time (the request time without history): no later event or request changes it
            ctx_t = batch.request_timestamps
            if batch.history_timestamps.numel():
                first = batch.history_timestamps[h_off[:-1].clamp(max=batch.history_timestamps.numel() - 1)]
                ctx_t = torch.where(h_len > 0, first, ctx_t)
            ctx_t = torch.repeat_interleave(ctx_t, f)

        e = positions_in_sequence(h_off, int(batch.history_items.numel()))  # event index within its history
        h_seq = torch.repeat_interleave(torch.arange(b, device=device), h_len)
        item_pos = f + m * e
        item_dst = starts[h_seq] + item_pos
        # Time each history row predicts at: the next event's time, the request time after the last event.
        next_t = query_timestamps(batch.history_timestamps, h_off, batch.request_timestamps)

        c_seq = torch.repeat_interleave(torch.arange(b, device=device), k_len)
        cand_pos = f + m * h_len[c_seq]  # one shared position: candidates are unordered
        cand_dst = starts[c_seq] + cand_pos + positions_in_sequence(lengths_to_offsets(k_len), c_seq.numel())

        hist_emb, cand_emb = self._items(batch)
        action_emb = self.action_embedding(batch.history_actions)
        ctx_emb = self.user_embedding(batch.user_features).reshape(-1, cfg.embedding_dim)
        hist_t, cand_t = batch.history_timestamps, batch.candidate_timestamps
        # (embeddings, destination row, position, key time, query time) of every token kind.
        parts = [(ctx_emb, ctx_dst, ctx_pos, ctx_t, ctx_t)]
        if cfg.action_mode == "add":
            parts.append((hist_emb + action_emb, item_dst, item_pos, hist_t, next_t))
        else:  # an item token predicts its own action (query time = its own), the action token the next event
            parts.append((hist_emb, item_dst, item_pos, hist_t, hist_t))
            parts.append((action_emb, item_dst + 1, item_pos + 1, hist_t, next_t))
        parts.append((cand_emb, cand_dst, cand_pos, cand_t, cand_t))
        x, dst, positions, timestamps, query_ts = (torch.cat(column) for column in zip(*parts, strict=True))

        gather = torch.empty_like(dst)
        gather[dst] = torch.arange(dst.numel(), device=device)  # token order -> row order
        positions = positions[gather]
        x = x[gather] * math.sqrt(cfg.embedding_dim)
        x = self.input_embedding.dropout(x + self.input_embedding.position_embeddings(positions))
        return RankingTokens(x, offsets, max_len, positions, timestamps[gather], query_ts[gather], cand_dst, k_len)

    def forward(self, batch: RankingBatch) -> torch.Tensor:
        """Task outputs of every candidate ``[T, num_tasks]`` (logits for binary tasks)."""
        tokens = self.input_tokens(batch)
        h = self.encoder(
            tokens.x,
            tokens.offsets,
            tokens.max_len,
            tokens.timestamps,
            tokens.query_timestamps,
            num_targets=tokens.num_targets,
            contextual_seq_len=self.contextual_seq_len,
            positions=tokens.positions,
        )
        return self.heads(h[tokens.candidate_rows])
