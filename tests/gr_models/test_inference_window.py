"""window_inputs: the encoder inputs of only the rows a cached request computes equal the model's own input layer's
rows bit for bit (every action mode and context placement, any first row, several windows in one call)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gr_models.inference import CachedRankingScorer, Candidates, KVCache, UserEvents, UserHistory
from gr_models.inference.window import WindowRows, embed_window, window_ids, window_inputs
from gr_models.modules.hstu import HSTUConfig
from gr_models.ranking import HSTURankingConfig, HSTURankingModel, RankingFeatureSpec, RankingTask


def make_scorer(action_mode: str, context: str, bags: bool) -> CachedRankingScorer:
    spec = RankingFeatureSpec(
        num_items=40,
        num_actions=4,
        user_feature_names=("user_id", "age", "region"),
        user_feature_sizes=(10, 3, 5),
        item_bag_name="genre" if bags else None,
        item_bag_size=5 if bags else 0,
    )
    torch.manual_seed(0)
    cfg = HSTURankingConfig(
        spec,
        [RankingTask("like", "binary", 1.0)],
        action_mode=action_mode,
        embedding_dim=8,
        max_seq_len=40,
        head_hidden=4,
        dropout=0.0,
        context_attention=context,
        hstu=HSTUConfig(num_blocks=1, num_heads=2),
    )
    model = HSTURankingModel(cfg).eval()
    cache = KVCache.for_encoder(cfg.hstu, budget_bytes=1 << 16, page_size=4)
    return CachedRankingScorer(model, cache)


def window(seed: int, n: int, m: int, bags: bool, cand_times: bool) -> tuple[torch.Tensor, UserEvents, Candidates]:
    g = torch.Generator().manual_seed(seed)
    ts = 1000 + torch.sort(torch.randint(0, 5000, (n,), generator=g)).values
    ev_bags = [torch.randint(0, 5, (int(k),), generator=g).tolist() for k in torch.randint(0, 3, (n,), generator=g)]
    events = UserEvents.from_lists(
        torch.randint(0, 40, (n,), generator=g), torch.randint(0, 4, (n,), generator=g), ts, ev_bags if bags else None
    )
    c_bags = [torch.randint(0, 5, (int(k),), generator=g).tolist() for k in torch.randint(0, 3, (m,), generator=g)]
    times = torch.randint(6000, 9000, (m,), generator=g).tolist() if cand_times else None
    cands = Candidates.from_lists(torch.randint(0, 40, (m,), generator=g), c_bags if bags else None, times)
    feats = torch.tensor([seed % 10, seed % 3, seed % 5])
    return feats, events, cands


@settings(max_examples=30, deadline=None)
@given(
    mode=st.sampled_from([("add", "causal"), ("interleave", "causal"), ("add", "full"), ("interleave", "full")]),
    bags=st.booleans(),
    cand_times=st.booleans(),
    shapes=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 3), st.integers(0, 20)), min_size=1, max_size=3),
)
def test_window_inputs_equal_the_models_input_rows(mode, bags, cand_times, shapes):
    scorer = make_scorer(*mode, bags)
    model, f, m_tok = scorer.model, 3, scorer.tokens_per_event
    rows, wants = [], []
    for seed, (n, m, start_pick) in enumerate(shapes):
        feats, events, cands = window(seed, n, m, bags, cand_times)
        p = f + m_tok * n
        start = start_pick % (p + 1)
        t = 9500 + seed
        rows.append(WindowRows(feats, events, cands, t, start))
        # (the model's input layer cannot take a window of no items: a dummy candidate, not compared, gives it one)
        ref_cands = cands if m else Candidates.from_lists([0], [[]] if bags else None)
        with torch.inference_mode():
            batch = scorer._batch(UserHistory(feats, events), ref_cands, t)
            tokens = model.input_tokens(batch, check_max_len=False)
        tokens.candidate_rows = tokens.candidate_rows[:m]
        wants.append((tokens, p, start, m))
    x, infos = window_inputs(model, rows, torch.device("cpu"), torch.float32)
    assert x.shape[0] == sum(p - start + m for _, p, start, m in wants)
    for (tokens, p, start, m), info in zip(wants, infos, strict=True):
        assert (info.prefix_len, info.start, info.num_candidates) == (p, start, m)
        mine = x[info.row0 : info.row0 + p - start + m]
        assert torch.equal(mine[: p - start], tokens.x[start:p])
        assert torch.equal(mine[p - start :], tokens.x[tokens.candidate_rows])
        assert torch.equal(info.prefix_key_times, tokens.timestamps[:p])
        assert torch.equal(info.query_times, tokens.query_timestamps[start:p])
        assert torch.equal(info.candidate_times, tokens.timestamps[tokens.candidate_rows])
        assert torch.equal(info.candidate_times, tokens.query_timestamps[tokens.candidate_rows])
        # The positions the scorer's bias assumes: prefix row r at r, every candidate at P.
        assert torch.equal(tokens.positions[:p], torch.arange(p))
        assert bool((tokens.positions[tokens.candidate_rows] == p).all())


@settings(max_examples=20, deadline=None)
@given(
    mode=st.sampled_from([("add", "causal"), ("interleave", "causal"), ("add", "full"), ("interleave", "full")]),
    bags=st.booleans(),
    shapes=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 3), st.integers(0, 20)), min_size=1, max_size=3),
    pad=st.tuples(st.integers(1, 9), st.integers(0, 9), st.integers(0, 9)),
)
def test_padded_window_pieces_give_the_same_rows(mode, bags, shapes, pad):
    """What a CUDA-graph pass builds: the ids padded (items, bag values, rows) give the unpadded rows first."""
    scorer = make_scorer(*mode, bags)
    model, f, m_tok = scorer.model, 3, scorer.tokens_per_event
    rows = []
    for seed, (n, m, start_pick) in enumerate(shapes):
        feats, events, cands = window(seed, n, m, bags, False)
        rows.append(WindowRows(feats, events, cands, 9500 + seed, start_pick % (f + m_tok * n + 1)))
    ids = window_ids(model, rows)
    want, _ = window_inputs(model, rows, torch.device("cpu"), torch.float32)
    items, values = ids.items.numel() + pad[0], ids.bag_values.numel() + pad[1]
    pieces, num_items = ids.pieces(items, values, ids.rows + pad[2])
    assert num_items == items and pieces["w_bag_lengths"].sum() == values
    got = embed_window(model, pieces, num_items, torch.float32)
    assert got.shape[0] == ids.rows + pad[2]
    assert torch.equal(got[: ids.rows], want)
    with pytest.raises(ValueError, match="padding"):
        ids.pieces(ids.items.numel() - 1 if ids.items.numel() else 0, ids.bag_values.numel() + 1, ids.rows)


def test_same_device_treats_an_unindexed_device_as_the_current_one():
    from gr_models.inference.scorer import _same_device

    cpu = torch.device("cpu")
    assert _same_device(cpu, torch.device("cpu"))
    assert not _same_device(cpu, torch.device("meta"))
    if torch.cuda.is_available():
        here = torch.cuda.current_device()
        assert _same_device(torch.device("cuda"), torch.device("cuda", here))
        assert not _same_device(torch.device("cuda", here), cpu)
