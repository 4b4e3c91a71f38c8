"""Encoder inputs of only the rows a cached request computes: rows ``[start, P)`` of a user's prefix and the candidates.

``HSTURankingModel.input_tokens`` builds every row of ``[features | history | candidates]``; a cache hit computes
a handful of prefix rows (the last history token, new events) and the candidates, and its relative bias needs only
the key times of the prefix (positions are implied: prefix row ``r`` sits at position ``r``, every candidate at
``P``). ``window_inputs`` builds exactly that for a group of users, through one call of each embedding table and
one host-to-device copy of the ids (no device sync), with the same arithmetic as ``input_tokens`` (a test compares
the rows bit for bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from gr_models.inference.lru import LruDict
from gr_models.inference.requests import Candidates
from gr_models.ranking.hstu_ranking import HSTURankingModel
from gr_models.transfer import to_device


@dataclass
class WindowRows:
    """What ``window_inputs`` needs of one user: compute prefix rows ``[start, P)`` of the window ``features |
    events`` and the candidates, at ``request_time``."""

    user_features: torch.Tensor  # int64 [F] (CPU)
    events: object  # UserEvents of the window (CPU)
    candidates: Candidates
    request_time: int
    start: int


@dataclass
class WindowInputs:
    """One user's part of ``window_inputs``: its rows are ``x[row0 : row0 + (P - start) + M]`` (prefix rows
    ``[start, P)``, then the candidates in order). Times are CPU int64."""

    row0: int
    start: int
    prefix_len: int  # P
    num_candidates: int  # M
    prefix_key_times: torch.Tensor  # [P]: key time of every prefix row (the relative bias reads them as keys)
    query_times: torch.Tensor  # [P - start]: the time rows [start, P) predict at
    candidate_times: torch.Tensor  # [M]: key and query time of each candidate

    @property
    def num_prefix_rows(self) -> int:
        return self.prefix_len - self.start


def prefix_times(model: HSTURankingModel, events, request_time: int) -> tuple[np.ndarray, np.ndarray]:
    """Key times ``[P]`` and query times ``[P]`` of the prefix rows ``features | events`` (``input_tokens``'s), as
    int64 NumPy arrays (host index arithmetic in NumPy: a cache hit's few small steps cost far less than in torch)."""
    cfg = model.config
    f, m = cfg.features.num_user_features, cfg.tokens_per_event
    ts = events.timestamps.numpy()
    # "causal": the context rows are timed at the first event (the request time without history)
    ctx_t = request_time if cfg.context_attention == "full" or len(ts) == 0 else int(ts[0])
    ctx = np.full(f, ctx_t, dtype=np.int64)
    next_t = np.concatenate((ts[1:], np.array([request_time], dtype=np.int64))) if len(ts) else ts
    if m == 1:
        keys, queries = ts, next_t
    else:  # interleave: the item token predicts at its own time, the action token at the next event's
        keys = np.repeat(ts, 2)
        queries = np.stack([ts, next_t], axis=1).reshape(-1)
    return np.concatenate((ctx, keys)), np.concatenate((ctx, queries))


@dataclass
class WindowIds:
    """Host side of ``window_inputs``: the ids of every computed row, before they go to the device.

    Token table rows are blocks ``[user features | block 1 | block 2]`` of ``num_items`` rows each (events then
    candidates): "add" mode (one token per event) has ``item + action`` in block 1 (the events' rows) and the bare
    item in block 2 (the candidates' rows); "interleave" has the item in block 1 and the action in block 2.
    ``gather_block`` / ``gather_offset`` name each computed row's table row before the block sizes are fixed, so a
    CUDA-graph pass can pad every piece to its bucket (``pieces``) and rebuild the same rows on the device."""

    items: torch.Tensor  # [num events + candidates]
    bag_values: torch.Tensor
    bag_lengths: torch.Tensor  # per item row
    actions: torch.Tensor  # [num events] (candidates carry none)
    gather_block: torch.Tensor  # per computed row: 0 user features, 1 or 2 (see above)
    gather_offset: torch.Tensor  # row inside its block
    positions: torch.Tensor  # per computed row
    features: torch.Tensor  # [users with a computed feature row, F]
    infos: list[WindowInputs]
    # Padded ``w_gather`` / ``w_positions`` by padding, shared by every ``WindowIds`` of one layout (``window_ids``'s
    # ``layouts``); None: built on each call.
    padded_rows: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def rows(self) -> int:
        return self.positions.numel()

    def pieces(self, item_rows: int | None = None, bag_values: int | None = None, rows: int | None = None):
        """``(pieces, num_items)``: the named id tensors (CPU int64), padded to ``item_rows`` item rows,
        ``bag_values`` bag values and ``rows`` computed rows when given (padding items are id 0 with empty bags but
        the last, which takes the padding bag values; padding rows read table row 0 at position 0), and the item
        rows of a block. ``embed_window`` turns them into the rows ``window_inputs`` gives."""
        pieces, n_pad = self.host_pieces(item_rows, bag_values, rows)
        return {name: torch.from_numpy(a) for name, a in pieces.items()}, n_pad

    def host_pieces(self, item_rows: int | None = None, bag_values: int | None = None, rows: int | None = None):
        """``pieces`` as int64 NumPy arrays (what a pass packs into its one host-to-device copy)."""
        n = self.items.numel()
        n_pad = n if item_rows is None else item_rows
        v_pad = self.bag_values.numel() if bag_values is None else bag_values
        r_pad = self.rows if rows is None else rows
        extra_v = v_pad - self.bag_values.numel()
        if n_pad < n or r_pad < self.rows or extra_v < 0 or (extra_v > 0 and n_pad == n):
            raise ValueError(
                f"padding ({n_pad} items, {v_pad} bag values, {r_pad} rows) below the window's ({n}, "
                f"{self.bag_values.numel()}, {self.rows}), or bag padding without a padding item row"
            )
        lens = _padded(self.bag_lengths.numpy(), n_pad)
        if extra_v:
            lens[-1] = extra_v
        feat_rows = self.features.numel()
        rows_of = self.padded_rows.get((n_pad, r_pad)) if self.padded_rows is not None else None
        if rows_of is None:
            bases = np.array([0, feat_rows, feat_rows + n_pad], dtype=np.int64)
            gather = _padded(bases[self.gather_block.numpy()] + self.gather_offset.numpy(), r_pad)
            rows_of = gather, _padded(self.positions.numpy(), r_pad)
            if self.padded_rows is not None:
                self.padded_rows[(n_pad, r_pad)] = rows_of
        pieces = {
            "w_items": _padded(self.items.numpy(), n_pad),
            "w_bag_values": _padded(self.bag_values.numpy(), v_pad),
            "w_bag_lengths": lens,
            "w_actions": _padded(self.actions.numpy(), n_pad),
            "w_gather": rows_of[0],  # (shared between calls: read only)
            "w_positions": rows_of[1],
        }
        if feat_rows:
            pieces["w_features"] = self.features.numpy().reshape(-1)
        return pieces, n_pad


def _joined(parts: list[np.ndarray]) -> torch.Tensor:
    """The int64 arrays end to end as a CPU tensor (empty when there are none)."""
    return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.int64)


def _padded(a: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.int64)
    out[: a.size] = a
    return out


def window_ids(
    model: HSTURankingModel,
    windows: list[WindowRows],
    layouts: LruDict | None = None,
) -> WindowIds:
    """The host half of ``window_inputs``: every window's ids and each window's row range and times (index
    arithmetic in NumPy, the results as CPU int64 tensors).

    ``layouts`` (a caller's bounded memo): the computed rows' table rows and positions
    depend only on each window's ``(start, events, candidates)`` counts, so a repeated layout (every cache hit of
    the same user) reuses them and their padded forms instead of rebuilding them (the ids are built anew)."""
    cfg = model.config
    f, m = cfg.features.num_user_features, cfg.tokens_per_event
    # Per window: the events from e0 on (the first one a computed row belongs to), the user features if a context
    # row is computed.
    ev_items, ev_bag_vals, ev_bag_lens, actions, cand_items, cand_bag_vals, cand_bag_lens, feats = (
        [] for _ in range(8)
    )
    plans, infos = [], []
    n_ev = n_cand = n_feat_users = row = 0
    for w in windows:
        ev, n = w.events, len(w.events)
        p = f + m * n
        if not 0 <= w.start <= p:
            raise ValueError(f"start {w.start} outside the prefix [0, {p}]")
        e0 = max(0, (w.start - f) // m)
        bag_lens = ev.bag_lengths.numpy()
        bag0 = int(bag_lens[:e0].sum()) if e0 else 0
        ev_items.append(ev.items.numpy()[e0:])
        ev_bag_vals.append(ev.bag_values.numpy()[bag0:])
        ev_bag_lens.append(bag_lens[e0:])
        actions.append(ev.actions.numpy()[e0:])
        c = w.candidates
        cand_items.append(c.items.numpy())
        cand_bag_vals.append(c.bag_values.numpy())
        cand_bag_lens.append(c.bag_lengths.numpy())
        feat_row = None
        if w.start < f:
            feats.append(w.user_features.numpy().reshape(1, -1))
            feat_row = n_feat_users * f
            n_feat_users += 1
        plans.append((w, e0, n, p, feat_row, n_ev, n_cand))
        keys, queries = prefix_times(model, ev, w.request_time)
        cand_t = (
            torch.from_numpy(np.full(len(c), w.request_time, dtype=np.int64)) if c.timestamps is None else c.timestamps
        )
        infos.append(
            WindowInputs(row, w.start, p, len(c), torch.from_numpy(keys), torch.from_numpy(queries[w.start :]), cand_t)
        )
        n_ev += n - e0
        n_cand += len(c)
        row += p - w.start + len(c)
    layout = tuple((w.start, len(w.events), len(w.candidates)) for w in windows) if layouts is not None else None
    rows = layouts.lookup(layout) if layouts is not None else None
    if rows is None:
        rows = _computed_rows(plans, f, m, n_ev), {}
        if layouts is not None:
            layouts.store(layout, rows)
    (gather_block, gather_offset, positions), padded_rows = rows

    return WindowIds(
        items=_joined(ev_items + cand_items),
        bag_values=_joined(ev_bag_vals + cand_bag_vals),
        bag_lengths=_joined(ev_bag_lens + cand_bag_lens),
        actions=_joined(actions),
        gather_block=gather_block,
        gather_offset=gather_offset,
        positions=positions,
        features=torch.from_numpy(np.concatenate(feats)) if feats else torch.zeros(0, f, dtype=torch.int64),
        infos=infos,
        padded_rows=padded_rows if layouts is not None else None,
    )


def _computed_rows(plans: list, f: int, m: int, n_ev: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``window_ids``' gather block, gather offset and position of every computed row (read only once returned:
    a layout memo shares them)."""
    # Every computed row as (block, offset): features in block 0; an event's item token in block 1, its action
    # token ("interleave") in block 2; a candidate in block 2 ("add": the bare item) or block 1 ("interleave").
    cand_block = 2 if m == 1 else 1
    blocks, offsets, positions = [], [], []
    for w, e0, n, p, feat_row, ev_off, cand_off in plans:
        if feat_row is not None:
            k = f - w.start
            blocks.append(np.zeros(k, dtype=np.int64))
            offsets.append(np.arange(feat_row + w.start, feat_row + f, dtype=np.int64))
        ev_rows = np.arange(ev_off, ev_off + n - e0, dtype=np.int64)
        ev_blocks = np.ones(n - e0, dtype=np.int64)
        if m == 2:
            ev_rows = np.repeat(ev_rows, 2)
            ev_blocks = np.stack([ev_blocks, ev_blocks + 1], axis=1).reshape(-1)
        first = f + m * e0  # row of the first token of event e0
        skip = max(0, w.start - first)
        m_c = len(w.candidates)
        blocks += [ev_blocks[skip:], np.full(m_c, cand_block, dtype=np.int64)]
        offsets += [ev_rows[skip:], np.arange(n_ev + cand_off, n_ev + cand_off + m_c, dtype=np.int64)]
        positions += [np.arange(w.start, p, dtype=np.int64), np.full(m_c, p, dtype=np.int64)]

    return _joined(blocks), _joined(offsets), _joined(positions)


def embed_window(
    model: HSTURankingModel, d: dict[str, torch.Tensor], num_items: int, dtype: torch.dtype
) -> torch.Tensor:
    """The device half of ``window_inputs``: encoder input rows ``[rows, D]`` in ``dtype`` from the id pieces ``d``
    (``WindowIds.pieces``, on the embedding tables' device) with ``num_items`` item rows per block. Issues no host
    sync, so a CUDA graph can capture it."""
    cfg = model.config
    f, m, d_model = cfg.features.num_user_features, cfg.tokens_per_event, cfg.embedding_dim
    parts = []
    feats = d.get("w_features")
    if feats is not None and feats.numel():
        parts.append(model.user_embedding(feats.view(-1, f)).reshape(-1, d_model))
    if num_items:  # (TorchRec cannot look up zero ids)
        emb = model.input_embedding.embed_ids(d["w_items"])
        if model.bag_embedding is not None:
            emb = emb + model.bag_embedding(d["w_bag_values"], d["w_bag_lengths"])
        action_emb = model.action_embedding(d["w_actions"])
        parts += [emb + action_emb, emb] if m == 1 else [emb, action_emb]
    if not parts:  # nothing to compute (e.g. an append of no events to a cached user)
        return torch.zeros(0, d_model, device=d["w_positions"].device, dtype=dtype)
    table = torch.cat(parts) if len(parts) > 1 else parts[0]
    x = table.index_select(0, d["w_gather"]) * math.sqrt(d_model)
    x = model.input_embedding.dropout(x + model.input_embedding.position_embeddings(d["w_positions"]))
    return x.to(dtype)


def embed_window_ids(model: HSTURankingModel, ids: WindowIds, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``ids``' rows on ``device`` in ``dtype``: one host-to-device copy of every id, then ``embed_window``."""
    if ids.rows == 0:
        return torch.zeros(0, model.config.embedding_dim, device=device, dtype=dtype)
    pieces, num_items = ids.pieces()
    sizes = [t.numel() for t in pieces.values()]
    emb_device = model.action_embedding.weight.device
    d = dict(zip(pieces, to_device(torch.cat(list(pieces.values())), emb_device).split(sizes), strict=True))
    return embed_window(model, d, num_items, dtype).to(device)


def window_inputs(
    model: HSTURankingModel, windows: list[WindowRows], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, list[WindowInputs]]:
    """Encoder input rows ``x [R, D]`` (in ``dtype`` on ``device``) of every window's prefix rows ``[start, P)`` and
    candidates, stacked window after window, and each window's row range and times."""
    ids = window_ids(model, windows)
    return embed_window_ids(model, ids, device, dtype), ids.infos
