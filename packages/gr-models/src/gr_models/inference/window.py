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

import torch

from gr_models.inference.requests import Candidates
from gr_models.inference.transfer import to_device
from gr_models.ranking.hstu_ranking import HSTURankingModel


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


def prefix_times(model: HSTURankingModel, events, request_time: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key times ``[P]`` and query times ``[P]`` of the prefix rows ``features | events`` (``input_tokens``'s)."""
    cfg = model.config
    f, m = cfg.features.num_user_features, cfg.tokens_per_event
    ts = events.timestamps
    # "causal": the context rows are timed at the first event (the request time without history)
    ctx_t = request_time if cfg.context_attention == "full" or len(events) == 0 else int(ts[0])
    ctx = torch.full((f,), ctx_t, dtype=torch.int64)
    next_t = torch.cat([ts[1:], torch.tensor([request_time], dtype=torch.int64)]) if len(events) else ts
    if m == 1:
        keys, queries = ts, next_t
    else:  # interleave: the item token predicts at its own time, the action token at the next event's
        keys = ts.repeat_interleave(2)
        queries = torch.stack([ts, next_t], dim=1).reshape(-1)
    return torch.cat([ctx, keys]), torch.cat([ctx, queries])


def window_inputs(
    model: HSTURankingModel, windows: list[WindowRows], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, list[WindowInputs]]:
    """Encoder input rows ``x [R, D]`` (in ``dtype`` on ``device``) of every window's prefix rows ``[start, P)`` and
    candidates, stacked window after window, and each window's row range and times."""
    cfg = model.config
    f, m, d = cfg.features.num_user_features, cfg.tokens_per_event, cfg.embedding_dim
    emb_device = model.action_embedding.weight.device
    # Per window: the events from e0 on (the first one a computed row belongs to), the user features if a context
    # row is computed. Token table rows: [user features | event items (+ action in "add" mode) | candidate items |
    # actions ("interleave")]; ``gather`` picks each computed row from it.
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
        bag0 = int(w.events.bag_lengths[:e0].sum()) if e0 else 0
        ev_items.append(ev.items[e0:])
        ev_bag_vals.append(ev.bag_values[bag0:])
        ev_bag_lens.append(ev.bag_lengths[e0:])
        actions.append(ev.actions[e0:])
        c = w.candidates
        cand_items.append(c.items)
        cand_bag_vals.append(c.bag_values)
        cand_bag_lens.append(c.bag_lengths)
        feat_row = None
        if w.start < f:
            feats.append(w.user_features.view(1, -1))
            feat_row = n_feat_users * f
            n_feat_users += 1
        plans.append((w, e0, n, p, feat_row, n_ev, n_cand))
        keys, queries = prefix_times(model, ev, w.request_time)
        cand_t = torch.full((len(c),), w.request_time, dtype=torch.int64) if c.timestamps is None else c.timestamps
        infos.append(WindowInputs(row, w.start, p, len(c), keys, queries[w.start :], cand_t))
        n_ev += n - e0
        n_cand += len(c)
        row += p - w.start + len(c)
    n_feat_rows = n_feat_users * f
    item_base, cand_base, action_base = n_feat_rows, n_feat_rows + n_ev, n_feat_rows + n_ev + n_cand
    gather, positions = [], []
    for w, e0, n, p, feat_row, ev_off, cand_off in plans:
        if feat_row is not None:
            gather.append(torch.arange(feat_row + w.start, feat_row + f))
        ev_rows = torch.arange(item_base + ev_off, item_base + ev_off + n - e0)
        if m == 2:
            act_rows = torch.arange(action_base + ev_off, action_base + ev_off + n - e0)
            ev_rows = torch.stack([ev_rows, act_rows], dim=1).reshape(-1)
        first = f + m * e0  # row of the first token of event e0
        gather.append(ev_rows[max(0, w.start - first) :])
        gather.append(torch.arange(cand_base + cand_off, cand_base + cand_off + len(w.candidates)))
        positions.append(torch.arange(w.start, p))
        positions.append(torch.full((len(w.candidates),), p, dtype=torch.int64))
    pieces = [
        torch.cat(ev_items + cand_items),
        torch.cat(ev_bag_vals + cand_bag_vals),
        torch.cat(ev_bag_lens + cand_bag_lens),
        torch.cat(actions),
        torch.cat(gather),
        torch.cat(positions),
    ]
    if feats:
        pieces.append(torch.cat(feats).reshape(-1))
    sizes = [t.numel() for t in pieces]
    ids = list(to_device(torch.cat(pieces), emb_device).split(sizes))
    items, bag_vals, bag_lens, action_ids, gather_t, positions_t = ids[:6]

    parts = []
    if feats:
        parts.append(model.user_embedding(ids[6].view(n_feat_users, f)).reshape(-1, d))
    if n_ev + n_cand:  # (TorchRec cannot look up zero ids)
        emb = model.input_embedding.embed_ids(items)
        if model.bag_embedding is not None:
            emb = emb + model.bag_embedding(bag_vals, bag_lens)
        action_emb = model.action_embedding(action_ids)
        parts += [emb[:n_ev] + action_emb, emb[n_ev:]] if m == 1 else [emb, action_emb]
    if not parts:  # nothing to compute (e.g. an append of no events to a cached user)
        return torch.zeros(0, d, device=device, dtype=dtype), infos
    table = torch.cat(parts) if len(parts) > 1 else parts[0]
    x = table.index_select(0, gather_t) * math.sqrt(d)
    x = model.input_embedding.dropout(x + model.input_embedding.position_embeddings(positions_t))
    return x.to(device=device, dtype=dtype), infos
