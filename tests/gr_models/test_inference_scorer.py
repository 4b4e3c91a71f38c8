"""CachedRankingScorer: cached == uncached, micro-batched == all at once, incremental append == full recompute,
eviction / version invalidation / window slides stay exact, bf16 within tolerance, malformed requests rejected."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gr_models.data.ranking import RankingBatch
from gr_models.inference import (
    CachedRankingScorer,
    Candidates,
    CastRankingModel,
    InferenceInputError,
    KVCache,
    UserEvents,
    UserRequest,
    model_fingerprint,
)
from gr_models.inference.pass_graphs import PassGraphs, pass_shape
from gr_models.modules.hstu import HSTUConfig
from gr_models.ranking import HSTURankingConfig, HSTURankingModel, RankingFeatureSpec, RankingTask

SPEC = RankingFeatureSpec(
    num_items=50,
    num_actions=5,
    user_feature_names=("user_id", "age"),
    user_feature_sizes=(10, 3),
    item_bag_name="genre",
    item_bag_size=6,
)
TASKS = [RankingTask("like", "binary", 1.0), RankingTask("rating", "regression", 0.5)]
FEATS = [4, 2]
TOL = 1e-5


def make_model(
    context: str = "causal", action_mode: str = "add", use_rab: bool = True, max_attn_len: int = 0, seed: int = 0
) -> HSTURankingModel:
    torch.manual_seed(seed)
    cfg = HSTURankingConfig(
        SPEC,
        TASKS,
        action_mode=action_mode,
        embedding_dim=16,
        max_seq_len=64,
        head_hidden=8,
        context_attention=context,
        hstu=HSTUConfig(num_blocks=3, num_heads=2, use_rab=use_rab, max_attn_len=max_attn_len, alpha=0.5),
    )
    model = HSTURankingModel(cfg).eval()
    # Larger-than-init weights so that every token visibly moves every later one (a stale K/V would show).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def make_scorer(model: HSTURankingModel, micro_batch: int = 3, budget: int = 1 << 20, **kw) -> CachedRankingScorer:
    dtype = kw.pop("dtype", torch.float32)
    cache = KVCache.for_encoder(model.config.hstu, budget_bytes=budget, page_size=4, dtype=dtype)
    return CachedRankingScorer(model, cache, micro_batch=micro_batch, dtype=dtype, **kw)


def events(n: int, start_t: int, seed: int) -> UserEvents:
    g = torch.Generator().manual_seed(seed)
    ts = start_t + torch.sort(torch.randint(0, 5000, (n,), generator=g)).values
    bags = [torch.randint(0, 6, (int(k),), generator=g).tolist() for k in torch.randint(0, 3, (n,), generator=g)]
    return UserEvents.from_lists(
        torch.randint(0, 50, (n,), generator=g), torch.randint(0, 5, (n,), generator=g), ts, bags
    )


def candidates(m: int, seed: int, timestamps: list[int] | None = None) -> Candidates:
    g = torch.Generator().manual_seed(seed + 1000)
    bags = [torch.randint(0, 6, (int(k),), generator=g).tolist() for k in torch.randint(0, 3, (m,), generator=g)]
    return Candidates.from_lists(torch.randint(0, 50, (m,), generator=g), bags, timestamps)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    # fp32 paths that sum in different orders (cached vs recomputed prefix) differ in the last bits of each value:
    # the bound scales with the magnitude (scores near 9 differed by 1e-4 in a hypothesis example).
    if a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    scale = 1.0 + float(b.float().abs().max())
    return float((a.float() - b.float()).abs().max()) <= tol * scale


VARIANTS = [
    dict(context="causal", action_mode="add"),
    dict(context="causal", action_mode="interleave"),
    dict(context="causal", action_mode="add", use_rab=False),
    dict(context="causal", action_mode="add", max_attn_len=4),
    dict(context="full", action_mode="add"),
    dict(context="full", action_mode="interleave", use_rab=False),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_append_sequence_matches_full_recompute(variant):
    """A user's life: cold start, appends of 0..5 events at later request times, repeated requests. After every
    step the cached, micro-batched scores equal one uncached forward of the whole sequence."""
    model = make_model(**variant)
    scorer = make_scorer(model)
    history = UserEvents.empty()
    t = 10_000
    for step, n_new in enumerate([0, 5, 1, 0, 3, 0, 2]):
        new = events(n_new, t, seed=step)
        history = history.concat(new)
        t = (history.last_timestamp or t) + 100 * (step % 3)  # sometimes the same request time as the last event
        cands = candidates(7, seed=step)
        got = scorer.score("u", FEATS, new, cands, t)
        want = scorer.full_recompute(FEATS, history, cands, t)
        assert close(got, want), (step, float((got - want).abs().max()))
        assert close(scorer.score("u", FEATS, None, cands, t), want)  # the same request again: cache as is
    s = scorer.stats
    if variant["context"] == "causal":
        assert s.prefix_full == 1 and s.prefix_incremental >= 4, s  # only the first request misses
    else:
        assert s.prefix_incremental == 0 and s.prefix_full >= 4, s
    assert s.prefix_reused >= 7


def test_full_recompute_is_the_plain_model():
    model = make_model(context="full", action_mode="interleave")
    scorer = make_scorer(model)
    hist, cands = events(6, 0, 1), candidates(5, 1, timestamps=[9000, 9100, 9000, 9500, 9999])
    batch = RankingBatch(
        users=torch.zeros(1, dtype=torch.int64),
        user_features=torch.tensor([FEATS]),
        history_lengths=torch.tensor([6]),
        history_items=hist.items,
        history_actions=hist.actions,
        history_timestamps=hist.timestamps,
        history_bag_values=hist.bag_values,
        history_bag_lengths=hist.bag_lengths,
        candidate_lengths=torch.tensor([5]),
        candidate_items=cands.items,
        candidate_timestamps=cands.timestamps,
        candidate_bag_values=cands.bag_values,
        candidate_bag_lengths=cands.bag_lengths,
        request_timestamps=torch.tensor([9999]),
        labels={},
    )
    with torch.no_grad():
        want = model(batch)
    assert torch.equal(scorer.full_recompute(FEATS, hist, cands, 9999), want)
    assert close(scorer.score("u", FEATS, hist, cands, 9999), want)


@settings(max_examples=12, deadline=None)
@given(
    n_hist=st.integers(0, 12),
    m=st.integers(1, 14),
    micro_batch=st.integers(1, 16),
    interleave=st.booleans(),
)
def test_micro_batches_equal_all_at_once(n_hist, m, micro_batch, interleave):
    model = make_model(action_mode="interleave" if interleave else "add")
    scorer = make_scorer(model, micro_batch=micro_batch)
    hist, cands = events(n_hist, 0, 3), candidates(m, 3, timestamps=list(range(6000, 6000 + 37 * m, 37)))
    want = scorer.full_recompute(FEATS, hist, cands, 6000)
    assert close(scorer.score("u", FEATS, hist, cands, 6000), want)
    # Candidates are independent of each other: any order gives the same rows, permuted.
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(m))
    permuted = Candidates.from_lists(
        cands.items[perm], [candidates(m, 3).slice(int(i), int(i) + 1).bag_values.tolist() for i in perm],
        cands.timestamps[perm],
    )  # fmt: skip
    assert close(scorer.score("u", FEATS, None, permuted, 6000), want[perm])


def test_stale_last_token_or_full_context_would_be_caught():
    """Negative controls: skipping the last-token recompute (trap 2) or appending incrementally to a
    context_attention="full" model (trap 1) gives wrong scores, so the exactness tests above can fail."""
    hist, new, cands = events(6, 0, 5), events(2, 6000, 6), candidates(4, 5)
    for variant, hack in ((dict(context="causal"), "time_dependent"), (dict(context="full"), "incremental")):
        scorer = make_scorer(make_model(**variant))
        setattr(scorer, hack, not getattr(scorer, hack))
        scorer.score("u", FEATS, hist, cands, 5500)
        got = scorer.score("u", FEATS, new, cands, 12_000)
        want = scorer.full_recompute(FEATS, hist.concat(new), cands, 12_000)
        assert not close(got, want, 1e-3), hack


def test_eviction_and_reuse_across_users_stay_exact():
    model = make_model()
    # Room for about two users' prefixes: serving four users in turn evicts constantly.
    page_bytes = 3 * 4 * 2 * (8 + 8) * 4
    scorer = make_scorer(model, budget=10 * page_bytes)
    histories = {u: UserEvents.empty() for u in range(4)}
    t = 1000
    for rnd in range(3):
        for u in range(4):
            new = events(3 + u, t, seed=10 * rnd + u)
            histories[u] = histories[u].concat(new)
            t = histories[u].last_timestamp + 10
            cands = candidates(5, seed=u)
            got = scorer.score(u, [u, 1], new, cands, t)
            assert close(got, scorer.full_recompute([u, 1], histories[u], cands, t)), (rnd, u)
        t += 5000
    stats = scorer.cache.stats()
    assert stats.evictions > 0 and stats.bytes_used <= stats.bytes_capacity
    assert scorer.stats.prefix_full > 4  # evicted users were recomputed from their kept history


def test_micro_batches_beyond_max_seq_len_equal_per_candidate_forwards():
    """A full window (2 features + 61 events = 63 tokens of max_seq_len 64) with micro-batches of 5: too long for the
    plain model at once, but each candidate's scores equal the plain model on [prefix | that candidate]."""
    scorer = make_scorer(make_model(), micro_batch=5)
    hist, cands = events(61, 0, 4), candidates(12, 4)
    assert scorer.max_history_events == 61
    got = scorer.score("u", FEATS, hist, cands, 9000)
    want = torch.cat([scorer.full_recompute(FEATS, hist, cands.slice(i, i + 1), 9000) for i in range(12)])
    assert close(got, want)


def test_prefix_larger_than_the_cache_is_served_uncached():
    model = make_model()
    page_bytes = 3 * 4 * 2 * (8 + 8) * 4
    scorer = make_scorer(model, budget=2 * page_bytes)  # 8 tokens: less than features + 10 events
    hist, cands = events(10, 0, 2), candidates(4, 2)
    assert close(scorer.score("u", FEATS, hist, cands, 9000), scorer.full_recompute(FEATS, hist, cands, 9000))
    assert scorer.stats.prefix_uncacheable == 1 and "u" not in scorer.cache


def test_model_version_invalidates_and_weights_change_the_fingerprint():
    model = make_model()
    cache = KVCache.for_encoder(model.config.hstu, budget_bytes=1 << 20, page_size=4)
    hist, cands = events(5, 0, 1), candidates(3, 1)
    old = CachedRankingScorer(model, cache, micro_batch=2, model_version="v1")
    old.score("u", FEATS, hist, cands, 9000)
    new_model = make_model(seed=1)
    assert model_fingerprint(new_model) != model_fingerprint(model)
    new = CachedRankingScorer(new_model, cache, micro_batch=2)  # version = fingerprint of the new weights
    assert new.model_version == model_fingerprint(new_model)
    got = new.score("u", FEATS, hist, cands, 9000)
    assert cache.stats().invalidations == 1
    assert close(got, new.full_recompute(FEATS, hist, cands, 9000))
    assert not close(got, old.full_recompute(FEATS, hist, cands, 9000), 1e-3)


def test_history_window_slides_when_full():
    model = make_model(action_mode="interleave")
    scorer = make_scorer(model, micro_batch=4)  # (64 - 2 - 1) // 2 = 30 events fit
    assert scorer.max_history_events == 30
    history = UserEvents.empty()
    t = 0
    for step in range(4):
        new = events(11, t, seed=step)
        history = history.concat(new)
        t = history.last_timestamp + 1
        cands = candidates(2, step)  # the plain model takes 2 + 60 + 2 tokens at most
        got = scorer.score("u", FEATS, new, cands, t)
        assert close(got, scorer.full_recompute(FEATS, history.tail(30), cands, t)), step
    assert scorer.history("u").dropped == 44 - 30
    assert scorer.stats.full_fallback_reasons.get("history window slid") == 2


def test_user_features_change_recomputes_and_forget_and_invalidate():
    scorer = make_scorer(make_model())
    hist, cands = events(5, 0, 1), candidates(3, 1)
    scorer.score("u", FEATS, hist, cands, 9000)
    got = scorer.score("u", [7, 0], None, cands, 9000)
    assert close(got, scorer.full_recompute([7, 0], hist, cands, 9000))
    assert scorer.stats.full_fallback_reasons["user features changed"] == 1
    assert scorer.invalidate("u") and "u" not in scorer.cache and scorer.history("u") is not None
    assert close(scorer.score("u", [7, 0], None, cands, 9000), got)
    scorer.forget("u")
    assert scorer.history("u") is None  # cold start next time
    cold = scorer.score("u", [7, 0], None, cands, 9000)
    assert close(cold, scorer.full_recompute([7, 0], UserEvents.empty(), cands, 9000))


def test_append_then_score_equals_score_with_events():
    model = make_model()
    a, b = make_scorer(model), make_scorer(model)
    hist, new, cands = events(4, 0, 1), events(3, 6000, 2), candidates(5, 1)
    a.score("u", FEATS, hist, cands, 5900)
    b.score("u", FEATS, hist, cands, 5900)
    a.append("u", FEATS, new)
    assert close(a.score("u", FEATS, None, cands, 12_000), b.score("u", FEATS, new, cands, 12_000))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_paths(dtype):
    model = make_model(context="causal", action_mode="interleave")
    ref = make_scorer(model)
    half = make_scorer(model, dtype=dtype)
    history = UserEvents.empty()
    for step, n in enumerate([4, 3, 2]):
        new = events(n, step * 10_000, step)
        history = history.concat(new)
        t = history.last_timestamp + 50
        cands = candidates(6, step)
        want = ref.full_recompute(FEATS, history, cands, t)
        got = half.score("u", FEATS, new, cands, t)
        full_half = half.full_recompute(FEATS, history, cands, t)
        assert got.dtype == dtype and full_half.dtype == dtype
        scale = max(float(want.abs().max()), 1.0)
        ulp = scale * (2**-7 if dtype == torch.bfloat16 else 2**-10)  # at the output's magnitude
        # Against fp32: rounding through 3 layers (measured ~1% of the scale in bf16, ~0.1% in fp16).
        assert close(got, want, 4 * ulp), float((got.float() - want).abs().max())
        # Cached vs uncached in the same dtype: only the summation order differs.
        assert close(got, full_half, 2 * ulp), float((got.float() - full_half.float()).abs().max())
    assert next(model.encoder.parameters()).dtype == torch.float32  # the caller's model is untouched


def test_cast_model_in_fp32_is_the_model():
    model = make_model()
    cast = CastRankingModel(model, "fp32")
    assert cast.encoder is model.encoder
    with pytest.raises(ValueError, match="dtype must be one of"):
        CastRankingModel(model, "int8")


def test_malformed_requests_are_rejected_and_change_nothing():
    model = make_model()
    scorer = make_scorer(model, max_candidates=8)
    hist, cands = events(5, 0, 1), candidates(3, 1)
    want = scorer.score("u", FEATS, hist, cands, 9000)
    snapshot = (scorer.history("u").events, dataclasses.replace(scorer.stats), scorer.cache.stats())
    bad = [
        (dict(user_features=[1]), "user_features has 1 values"),
        (dict(user_features=[99, 0]), "user feature 'user_id' = 99 outside"),
        (dict(user_features="x"), "user_features must be"),
        (dict(new_events=UserEvents.from_lists([50], [0], [9000])), "item id 50 outside"),
        (dict(new_events=UserEvents.from_lists([1], [5], [9000])), "actions must lie in"),
        (dict(new_events=UserEvents.from_lists([1], [0], [10])), "before the user's last event"),
        (dict(new_events=UserEvents.from_lists([1], [0], [9001])), "after the request time"),
        (dict(new_events=UserEvents.from_lists([1], [0], [8000], [[6]])), "bag value 6 outside"),
        (dict(request_time=10), "before the user's last event"),
        (dict(request_time=9000.5), "request_time must be an int"),
        (dict(candidates=Candidates.from_lists([])), "no candidates"),
        (dict(candidates=candidates(9, 0)), "9 candidates > max_candidates=8"),
        (dict(candidates=Candidates.from_lists([-1])), "item id -1 outside"),
        (dict(candidates=[1, 2]), "candidates must be Candidates"),
        (dict(new_events=[1, 2]), "events must be UserEvents"),
    ]
    for change, message in bad:
        args = dict(user_features=FEATS, new_events=None, candidates=cands, request_time=9000) | change
        with pytest.raises(InferenceInputError, match=message):
            scorer.score("u", **args)
    assert scorer.history("u").events is snapshot[0] and scorer.cache.stats() == snapshot[2]
    assert scorer.stats == snapshot[1]
    assert close(scorer.score("u", FEATS, None, cands, 9000), want)


def test_request_pieces_validate_themselves():
    with pytest.raises(InferenceInputError, match="non-decreasing"):
        UserEvents.from_lists([1, 2], [0, 0], [5, 4])
    with pytest.raises(InferenceInputError, match="actions has 1 entries, items 2"):
        UserEvents.from_lists([1, 2], [0], [4, 5])
    with pytest.raises(InferenceInputError, match="2 bags for 1 items"):
        UserEvents.from_lists([1], [0], [4], [[1], [2]])
    with pytest.raises(InferenceInputError, match="must hold integers"):
        Candidates.from_lists([1.5])
    with pytest.raises(InferenceInputError, match="one entry per item"):
        Candidates.from_lists([1, 2], timestamps=[3])
    ev = events(6, 0, 0)
    later = events(6, 10_000, 1)
    both = ev.concat(later).tail(8)
    assert torch.equal(both.bag_values, torch.cat([ev.tail(2).bag_values, later.bag_values]))
    assert torch.equal(both.items, torch.cat([ev.items[4:], later.items]))
    assert len(ev.tail(10)) == 6 and torch.equal(ev.concat(UserEvents.empty()).items, ev.items)


def test_scorer_configuration_errors():
    model = make_model()
    cfg = model.config.hstu
    with pytest.raises(ValueError, match=r"cache dtype torch\.float32 differs"):
        CachedRankingScorer(model, KVCache.for_encoder(cfg, budget_bytes=1 << 20), dtype="bf16")
    other = dataclasses.replace(cfg, num_heads=1)
    with pytest.raises(ValueError, match="cache is shaped"):
        CachedRankingScorer(model, KVCache.for_encoder(other, budget_bytes=1 << 20))
    with pytest.raises(ValueError, match="micro_batch must be"):
        CachedRankingScorer(model, KVCache.for_encoder(cfg, budget_bytes=1 << 20), micro_batch=0)
    tight = make_model()
    tight.config.max_seq_len = 2
    with pytest.raises(ValueError, match="leaves no room"):
        CachedRankingScorer(tight, KVCache.for_encoder(cfg, budget_bytes=1 << 20))
    with pytest.raises(TypeError, match="HSTURankingModel"):
        CachedRankingScorer(torch.nn.Linear(2, 2), KVCache.for_encoder(cfg, budget_bytes=1 << 20))
    scorer = make_scorer(model)
    with pytest.raises(InferenceInputError, match="full recompute needs"):
        scorer.full_recompute(FEATS, events(60, 0, 0), candidates(8, 0), 10**6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_scorer_matches_cuda_full_recompute_and_the_cpu_reference(dtype):
    cpu_model = make_model(context="causal", action_mode="interleave")
    want = make_scorer(cpu_model)  # fp32 on the CPU
    model = make_model(context="causal", action_mode="interleave").cuda()
    cache = KVCache.for_encoder(model.config.hstu, budget_bytes=1 << 20, page_size=4, device="cuda", dtype=dtype)
    scorer = CachedRankingScorer(model, cache, micro_batch=3, dtype=dtype)
    history = UserEvents.empty()
    for step, n in enumerate([5, 2, 0, 3]):
        new = events(n, step * 10_000, step)
        history = history.concat(new)
        t = (history.last_timestamp or 0) + 50
        cands = candidates(7, step)
        got = scorer.score("u", FEATS, new, cands, t)
        assert got.device.type == "cuda" and got.dtype == dtype
        ref = want.full_recompute(FEATS, history, cands, t)
        ulp = max(float(ref.abs().max()), 1.0) * (2**-7 if dtype == torch.bfloat16 else 2**-20)
        assert close(got.cpu(), scorer.full_recompute(FEATS, history, cands, t).cpu(), max(2 * ulp, TOL))
        assert close(got.cpu(), ref, max(4 * ulp, 1e-4))


def test_causal_context_model_trains_and_batches_like_single_windows():
    """context_attention="causal" is an ordinary training option: forward/backward run, and a batch mixing empty
    and non-empty histories gives each window the scores it gets alone (the context time is per window)."""
    with pytest.raises(ValueError, match="context_attention must be"):
        HSTURankingConfig(SPEC, TASKS, context_attention="bogus")
    model = make_model(context="causal")
    scorer = make_scorer(model)
    windows = [
        (events(4, 0, 1), candidates(3, 1)),
        (UserEvents.empty(), candidates(2, 2)),
        (events(7, 0, 3), candidates(4, 3)),
    ]
    batch = RankingBatch(
        users=torch.arange(3),
        user_features=torch.tensor([FEATS, [1, 0], [9, 2]]),
        history_lengths=torch.tensor([len(h) for h, _ in windows]),
        history_items=torch.cat([h.items for h, _ in windows]),
        history_actions=torch.cat([h.actions for h, _ in windows]),
        history_timestamps=torch.cat([h.timestamps for h, _ in windows]),
        history_bag_values=torch.cat([h.bag_values for h, _ in windows]),
        history_bag_lengths=torch.cat([h.bag_lengths for h, _ in windows]),
        candidate_lengths=torch.tensor([len(c) for _, c in windows]),
        candidate_items=torch.cat([c.items for _, c in windows]),
        candidate_timestamps=torch.full((9,), 8000),
        candidate_bag_values=torch.cat([c.bag_values for _, c in windows]),
        candidate_bag_lengths=torch.cat([c.bag_lengths for _, c in windows]),
        request_timestamps=torch.full((3,), 8000),
        labels={},
    )
    with torch.no_grad():
        together = model(batch)
    alone = torch.cat(
        [scorer.full_recompute(f, h, c, 8000) for f, (h, c) in zip([FEATS, [1, 0], [9, 2]], windows, strict=True)]
    )
    assert close(together, alone)
    model.train()
    model(batch).sum().backward()
    grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# -- score_many: several users in one jagged pass ------------------------------------------------------------------

PAGE_BYTES = 3 * 4 * 2 * (8 + 8) * 4  # layers x page tokens x heads x (qk + v dims) x fp32, as make_scorer builds


@functools.cache
def shared_model(context: str, action_mode: str) -> HSTURankingModel:
    return make_model(context=context, action_mode=action_mode)


def outcome(fn, *args):
    """The result of ``fn(*args)``, or the InferenceInputError it raised."""
    try:
        return fn(*args)
    except InferenceInputError as exc:
        return exc


def same_outcome(got, want) -> bool:
    if isinstance(want, InferenceInputError):
        return isinstance(got, InferenceInputError) and str(got) == str(want)
    return isinstance(got, torch.Tensor) and close(got, want)


def same_history(a: CachedRankingScorer, b: CachedRankingScorer, user) -> bool:
    ha, hb = a.history(user), b.history(user)
    if ha is None or hb is None:
        return ha is hb
    fields = ("items", "actions", "timestamps", "bag_values", "bag_lengths")
    return (
        torch.equal(ha.user_features, hb.user_features)
        and ha.dropped == hb.dropped
        and all(torch.equal(getattr(ha.events, f), getattr(hb.events, f)) for f in fields)
    )


@settings(max_examples=20, deadline=None)
@given(
    model_kind=st.sampled_from([("causal", "add"), ("full", "add"), ("causal", "interleave")]),
    micro_batch=st.sampled_from([1, 2, 5]),
    tight=st.booleans(),
    warm=st.lists(st.tuples(st.integers(0, 4), st.sampled_from([0, 2, 5, 59])), max_size=4),
    group=st.lists(
        st.tuples(st.integers(0, 4), st.integers(0, 3), st.integers(1, 6), st.sampled_from(["next", "same", "feats"])),
        min_size=1,
        max_size=7,
    ),
)
def test_score_many_equals_sequential_score(model_kind, micro_batch, tight, warm, group):
    """A group of requests (cached and new users, appends of 0..3 events, window slides, "full" context models,
    repeated users, changed features, a repeated request time) scored with one score_many call equals score called
    per request in order: same scores (or the same error), same histories, and a cache that stays exact afterwards.
    ``tight``: a cache of 10 pages (evictions inside the group, 59-event users uncacheable), 3 users kept (a group
    forgets users), and one sequence per encoder pass."""
    model = shared_model(*model_kind)
    kw = dict(budget=10 * PAGE_BYTES, max_users=3, max_batch_bias_bytes=1) if tight else {}
    seq, many = make_scorer(model, micro_batch, **kw), make_scorer(model, micro_batch, **kw)
    t = 10_000
    for step, (user, n) in enumerate(warm):
        for scorer in (seq, many):
            scorer.score(user, [user, 1], events(n, t, seed=step), candidates(2, step), t + 5000)
        t += 6000
    requests, last_time = [], t
    for step, (user, n, m, kind) in enumerate(group):
        if kind == "same":  # no new events, the previous request's time: the cached prefix as it is
            new, request_time = None, last_time
        else:
            new, request_time = (events(n, t, seed=100 + step) if n else None), t + 5000
            t += 6000
        requests.append(UserRequest(user, [user, 2 if kind == "feats" else 1], new, candidates(m, step), request_time))
        last_time = request_time
    want = [outcome(seq.score, *request) for request in requests]
    passes_before = many.stats.encoder_passes
    got = many.score_many(requests)
    assert len(got) == len(want) and all(same_outcome(g, w) for g, w in zip(got, want, strict=True))
    assert many.stats.requests == seq.stats.requests and many.stats.candidates == seq.stats.candidates
    assert many.num_users == seq.num_users and all(same_history(many, seq, user) for user in range(5))
    if not any(user in {u for u, *_ in group[:i]} for i, (user, *_) in enumerate(group)):
        # distinct users: at most one pass of prefix updates and one of candidates (one sequence per pass if tight)
        assert tight or many.stats.encoder_passes - passes_before <= 2
    for user in range(5):  # what score_many left in the cache serves the next request exactly
        if many.history(user) is None:
            continue
        cands = candidates(3, 50 + user)
        got_next = many.score(user, [user, 1], None, cands, t + 5000)
        assert close(got_next, seq.score(user, [user, 1], None, cands, t + 5000))
        assert close(got_next[:1], many.full_recompute_user(user, cands.slice(0, 1), t + 5000))  # fits the window


def test_score_many_batches_a_group_into_two_encoder_passes():
    """Four users' appends go through one pass and their 12 micro-batches through another; the bias bound splits
    passes without changing a score and bounds the bias buffer; a repeated user splits the group in two runs."""
    model = make_model()
    group = [UserRequest(u, [u, 1], events(2 + u, 1000, seed=u), candidates(5, u), 9000) for u in range(4)]
    seq, many = make_scorer(model, micro_batch=2), make_scorer(model, micro_batch=2)
    want = [seq.score(*r) for r in group]
    assert seq.stats.encoder_passes == 8  # per user: the prefix, then its 3 micro-batches together
    got = many.score_many(group)
    assert many.stats.encoder_passes == 2 and all(close(g, w) for g, w in zip(got, want, strict=True))
    one_each = make_scorer(model, micro_batch=2, max_batch_bias_bytes=1)
    got = one_each.score_many(group)
    assert one_each.stats.encoder_passes == 4 + 12 and all(close(g, w) for g, w in zip(got, want, strict=True))
    # Candidate sequences: prefix (2 features + 2..5 events) + micro-batch (2, 2, 1): 9 9 8 | 8 8 7 | 7 7 6 6 | 6 5
    # rows packed longest first, as many per pass as B * N_longest^2 * 4 bytes <= 3 * 9^2 * 4 allows; prefixes
    # (4..7 rows) fit one pass.
    bound = 3 * 9 * 9 * 4
    three = make_scorer(model, micro_batch=2, max_batch_bias_bytes=bound)
    got = three.score_many(group)
    assert three.stats.encoder_passes == 1 + 4 and all(close(g, w) for g, w in zip(got, want, strict=True))
    assert three._rab_buffer.numel() * 4 <= max(bound, 4 * model.config.max_seq_len**2)
    # A repeated user: the second request sees the first one's events (two runs).
    repeat = [UserRequest(1, [1, 1], None, candidates(2, 8), 9000)]
    repeat.append(UserRequest(0, [0, 1], events(1, 9500, seed=9), candidates(2, 9), 15_000))
    repeat.append(UserRequest(0, [0, 1], None, candidates(2, 10), 15_000))
    want = [seq.score(*r) for r in repeat]
    before = many.stats.encoder_passes
    got = many.score_many(repeat)
    # run 1: user 1 reused (candidates only) with user 0's append (its 2 changed rows ride along with its single
    # micro-batch: one pass for both users); run 2: user 0 reused
    assert many.stats.encoder_passes - before == 1 + 1
    assert all(close(g, w) for g, w in zip(got, want, strict=True)) and len(many.history(0).events) == 3


def test_score_many_reports_bad_requests_in_place_and_scores_the_others():
    """A malformed request in a group gets its InferenceInputError in its slot (not raised), changes nothing, and
    the other requests get the scores they get without it."""
    model = make_model()
    seq, many = make_scorer(model), make_scorer(model)
    for scorer in (seq, many):
        for user in ("a", "b"):
            scorer.score(user, FEATS, events(4, 0, seed=len(user)), candidates(2, 1), 6000)
    b_events, (b_k, b_v) = many.history("b").events, many.cache.read("b")
    stats = dataclasses.replace(many.stats)
    good_a = UserRequest("a", FEATS, events(2, 7000, 2), candidates(3, 2), 12_000)
    bad_b = UserRequest("b", FEATS, UserEvents.from_lists([50], [0], [7000]), candidates(2, 3), 12_000)
    new_c = ("c", [1, 0], events(3, 7000, 4), candidates(4, 4), 12_000)  # a plain tuple works too
    bad_new_d = UserRequest("d", [99, 0], None, candidates(1, 5), 12_000)
    late_b = UserRequest("b", FEATS, None, candidates(2, 6), 100)  # repeated user, request before its last event
    got = many.score_many([good_a, bad_b, new_c, bad_new_d, ("e", FEATS), late_b, (["unhashable"], FEATS, None, 1, 2)])
    assert close(got[0], seq.score(*good_a)) and close(got[2], seq.score(*new_c))
    messages = {1: "item id 50 outside", 3: "user feature 'user_id' = 99", 4: "a request must be", 5: "before the user"}
    messages[6] = "hashable user_id"
    for i, message in messages.items():
        assert isinstance(got[i], InferenceInputError) and message in str(got[i]), (i, got[i])
    assert many.history("b").events is b_events and many.history("d") is None and many.num_users == 3
    k, v = many.cache.read("b")
    assert torch.equal(k, b_k) and torch.equal(v, b_v)
    assert many.stats.requests == stats.requests + 2 and many.stats.candidates == stats.candidates + 7
    cands = candidates(3, 7)
    assert close(many.score("b", FEATS, None, cands, 12_000), seq.score("b", FEATS, None, cands, 12_000))
    assert many.score_many([]) == [] and many.score_many([bad_b])[0].args == got[1].args


def test_score_many_keeps_the_cache_exact_when_a_group_evicts_or_forgets_its_own_users():
    """Inside one call: a user evicted by another's reservation after its cached rows were read is written back
    whole (not just its new rows), and a user forgotten by a later new user (max_users) leaves nothing cached."""
    model = make_model()
    many = make_scorer(model, budget=6 * PAGE_BYTES)  # 6 pages of 4 tokens
    for user in ("x", "y"):  # 2 features + 8 events = 10 tokens = 3 pages each: the pool is full
        many.score(user, FEATS, events(8, 0, seed=len(user)), candidates(2, 1), 6000)
    group = [  # x grows to 4 pages and evicts y, y's 12 tokens then evict x
        UserRequest("x", FEATS, events(3, 7000, 2), candidates(3, 2), 12_000),
        UserRequest("y", FEATS, events(2, 7000, 3), candidates(3, 3), 12_000),
    ]
    stats = dataclasses.replace(many.stats)
    got = many.score_many(group)
    assert many.stats.prefix_incremental == stats.prefix_incremental + 2 and many.cache.stats().evictions >= 2
    assert "y" in many.cache and many.cache.users() == ["y"]
    for (user, *_, cands, t), out in zip(group, got, strict=True):
        assert close(out, many.full_recompute_user(user, cands, t))
    cands = candidates(4, 4)  # served from y's entry as it is: every row of it must be right
    before = many.stats.prefix_reused
    assert close(many.score("y", FEATS, None, cands, 12_000), many.full_recompute_user("y", cands, 12_000))
    assert many.stats.prefix_reused == before + 1

    forgetful = make_scorer(model, max_users=2)
    group = [UserRequest(u, [1, 1], events(2, 0, seed=i), candidates(2, i), 6000) for i, u in enumerate("abc")]
    got = forgetful.score_many(group)
    assert forgetful.num_users == 2 and forgetful.history("a") is None and "a" not in forgetful.cache
    assert forgetful.cache.users() == ["b", "c"]
    for (_, feats, new, cands, t), out in zip(group, got, strict=True):
        assert close(out, forgetful.full_recompute(feats, new, cands, t))


# -- a cache hit in one encoder pass --------------------------------------------------------------------------------


@pytest.mark.parametrize("action_mode", ["add", "interleave"])
def test_cache_hit_runs_the_last_token_and_every_micro_batch_in_one_pass(action_mode):
    """A new request time (and a small append) recomputes the last history token(s) as extra queries of each
    candidate micro-batch: one encoder pass, exact scores, and the K/V it caches equal a prefix-only recompute."""
    model = make_model(action_mode=action_mode)
    fused, ref = make_scorer(model, micro_batch=4), make_scorer(model, micro_batch=4)
    hist, cands = events(6, 0, 1), candidates(7, 1)  # 7 candidates in 2 micro-batches: up to 4 rows may be repeated
    for scorer in (fused, ref):
        scorer.score("u", FEATS, hist, cands, 6000)
    history, t = hist, 6000
    for new in (None, events(1, 7000, 2), None):
        if new is not None:
            history = history.concat(new)
        t = max(t, history.last_timestamp) + 500
        before = dataclasses.replace(fused.stats)
        got = fused.score("u", FEATS, new, cands, t)
        assert fused.stats.encoder_passes == before.encoder_passes + 1
        assert fused.stats.prefix_incremental == before.prefix_incremental + 1
        changed = fused.tokens_per_event * (0 if new is None else len(new)) + 1  # the new rows and the last token
        assert fused.stats.tokens_computed == before.tokens_computed + changed
        assert close(got, fused.full_recompute(FEATS, history, cands, t))
        ref.append("u", FEATS, new if new is not None else UserEvents.empty(), t)  # prefix pass only, no candidates
        (k, v), (ref_k, ref_v) = fused.cache.read("u"), ref.cache.read("u")
        assert close(k, ref_k) and close(v, ref_v)


def test_many_changed_rows_get_a_pass_of_their_own():
    """Fusing repeats the changed prefix rows in every micro-batch, so a long recompute (a miss) with several
    micro-batches runs the prefix once and the candidates in a second pass; with one micro-batch it is one pass."""
    model = make_model()
    scorer = make_scorer(model, micro_batch=3)
    hist = events(6, 0, 1)  # 2 features + 6 events = 8 rows to compute
    scorer.score("a", FEATS, hist, candidates(7, 1), 6000)  # 3 micro-batches: (3 - 1) * 8 > 3 rows repeated
    assert scorer.stats.encoder_passes == 2
    got = scorer.score("b", FEATS, hist, candidates(3, 1), 6000)  # one micro-batch: the whole window at once
    assert scorer.stats.encoder_passes == 3
    assert close(got, scorer.full_recompute(FEATS, hist, candidates(3, 1), 6000))
    assert scorer.stats.tokens_computed == 16 and scorer.stats.prefix_full == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cache_hit_never_waits_for_the_device():
    """A cache hit (new request time, no events) issues no synchronising CUDA call: every index is built on the host
    and shipped with one non_blocking copy."""
    model = make_model(context="causal").cuda()
    cache = KVCache.for_encoder(
        model.config.hstu, budget_bytes=1 << 20, page_size=4, device="cuda", dtype=torch.bfloat16
    )
    scorer = CachedRankingScorer(model, cache, micro_batch=3, dtype=torch.bfloat16)
    hist, cands = events(9, 0, 1), candidates(7, 1)
    scorer.score("u", FEATS, hist, cands, 6000)
    scorer.score("u", FEATS, None, cands, 6500)  # warm-up: allocations, lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = scorer.score("u", FEATS, None, cands, 7000)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert close(got.float().cpu(), scorer.full_recompute(FEATS, hist, cands, 7000).float().cpu(), 0.1)


def test_riding_rows_split_over_several_passes_stay_exact():
    """With a bias bound of one sequence per pass, each micro-batch (with its copy of the recomputed last token) is a
    pass of its own: the scores and the K/V cached from the first micro-batch stay exact."""
    model = make_model()
    scorer = make_scorer(model, micro_batch=3, max_batch_bias_bytes=1)
    hist, cands = events(6, 0, 1), candidates(8, 1)
    scorer.score("u", FEATS, hist, candidates(2, 1), 6000)
    before = scorer.stats.encoder_passes
    got = scorer.score("u", FEATS, None, cands, 7000)  # 3 micro-batches, the last token rides along in each
    assert scorer.stats.encoder_passes == before + 3
    assert close(got, scorer.full_recompute(FEATS, hist, cands, 7000))
    assert close(scorer.score("u", FEATS, None, cands, 7000), got)  # served from the cache as it was left
    assert scorer.stats.prefix_reused == 1


# -- padded passes (what the CUDA graphs replay) --------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS[:4], ids=lambda v: "-".join(str(x) for x in v.values()))
def test_padded_passes_equal_the_plain_model(variant):
    """``cuda_graphs=True`` pads every pass over pooled keys to a bucket with one padding sequence (on the CPU the
    padded pass runs eagerly): the scores still equal the plain model, across appends, repeats and several users."""
    model = make_model(**variant)
    scorer = make_scorer(model, cuda_graphs=True, max_graphs=2)
    history = UserEvents.empty()
    t = 10_000
    for step, n_new in enumerate([4, 1, 0, 2, 0]):
        new = events(n_new, t, seed=step)
        history = history.concat(new)
        t = (history.last_timestamp or t) + 100
        cands = candidates(5 + step, seed=step)
        got = scorer.score("u", FEATS, new, cands, t)
        assert close(got, scorer.full_recompute(FEATS, history, cands, t)), step
    assert scorer.stats.padded_passes >= 4 and len(scorer.graphs) <= 2
    reqs = [("u", FEATS, None, candidates(4, 7), t + 50), ("v", FEATS, events(3, 0, 9), candidates(6, 8), t + 60)]
    many = scorer.score_many(reqs)
    assert close(many[0], scorer.full_recompute(FEATS, history, reqs[0][3], t + 50))
    assert close(many[1], scorer.full_recompute(FEATS, events(3, 0, 9), reqs[1][3], t + 60))


def test_pass_shape_buckets_and_pads_with_one_sequence():
    s = pass_shape([300, 40], [129, 3], 130, 140, need_output=True)
    assert (s.num_seqs, s.queries, s.pad_queries) == (3, 192, 60)
    assert s.keys % 256 == 0 and s.keys == 340 + s.pad_past + s.pad_queries and s.pad_past >= 0
    assert s.max_len == 512 and s.max_q == 192 and s.candidates == 192 and s.x_rows == 256
    same = pass_shape([301, 41], [129, 3], 130, 100, need_output=True)  # other lengths, same bucket
    assert same.bucket == s.bucket and same.pad_past != s.pad_past
    assert pass_shape([300, 40], [129, 3], 130, 140, need_output=False).bucket != s.bucket
    with pytest.raises(ValueError, match="max_graphs"):
        PassGraphs(0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_equal_eager_passes_and_reuse_their_bucket():
    model = make_model(context="causal").cuda()

    def scorer(graphs: bool) -> CachedRankingScorer:
        cache = KVCache.for_encoder(
            model.config.hstu, budget_bytes=1 << 20, page_size=4, device="cuda", dtype=torch.bfloat16
        )
        return CachedRankingScorer(model, cache, micro_batch=3, dtype=torch.bfloat16, cuda_graphs=graphs)

    graphed, eager = scorer(True), scorer(False)
    hist = events(9, 0, 1)
    for s in (graphed, eager):
        s.score("u", FEATS, hist, candidates(7, 1), 6000)
    captures = []
    for i, t in enumerate([6500, 7000, 7500]):  # cache hits of one bucket: captured once, then replayed
        cands = candidates(7, 2 + i)
        got, want = graphed.score("u", FEATS, None, cands, t), eager.score("u", FEATS, None, cands, t)
        assert close(got.float().cpu(), want.float().cpu(), 0.05), i
        assert close(got.float().cpu(), graphed.full_recompute(FEATS, hist, cands, t).float().cpu(), 0.1)
        captures.append(graphed.stats.graph_captures)
    assert captures[0] >= 1 and captures[1] == captures[2] == captures[0]
    assert eager.stats.padded_passes == 0 and graphed.stats.padded_passes >= 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_hits_queued_behind_a_busy_device_each_score_their_own_request():
    """A bucket's pinned staging buffer is refilled by every hit: hits issued while the device is still busy (their
    index copies not yet run) must not overwrite the indices an earlier hit's copy has yet to read."""
    model = make_model(context="causal").cuda()

    def scorer(graphs: bool) -> CachedRankingScorer:
        cache = KVCache.for_encoder(
            model.config.hstu, budget_bytes=1 << 20, page_size=4, device="cuda", dtype=torch.bfloat16
        )
        return CachedRankingScorer(model, cache, micro_batch=3, dtype=torch.bfloat16, cuda_graphs=graphs)

    graphed, eager = scorer(True), scorer(False)
    hist = events(9, 0, 1)
    for s in (graphed, eager):
        s.score("u", FEATS, hist, candidates(7, 1), 6000)
    graphed.score("u", FEATS, None, candidates(7, 2), 6100)  # captures the hits' bucket
    captures = graphed.stats.graph_captures
    requests = [(candidates(7, 3 + i), 6200 + 100 * i) for i in range(4)]
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # the copies below queue behind this
    got = [graphed.score("u", FEATS, None, cands, t) for cands, t in requests]
    assert graphed.stats.graph_captures == captures  # every hit replayed the one bucket (one staging buffer)
    for (cands, t), out in zip(requests, got, strict=True):
        want = eager.score("u", FEATS, None, cands, t)
        assert close(out.float().cpu(), want.float().cpu(), 0.05), t


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_passes_build_their_input_rows_inside_the_graph():
    """A static-table model on the cache's device (given as plain "cuda") builds a hit's input rows in the graph:
    no eager embedding of the rows."""
    model = make_model(context="causal").cuda()
    cache = KVCache.for_encoder(model.config.hstu, budget_bytes=1 << 20, page_size=4, device="cuda")
    scorer = CachedRankingScorer(model, cache, micro_batch=3, cuda_graphs=True)
    assert scorer._window_in_graph
    hist = events(9, 0, 1)
    scorer.score("u", FEATS, hist, candidates(7, 1), 6000)
    got = scorer.score("u", FEATS, None, candidates(7, 2), 6500)
    assert close(got.cpu(), scorer.full_recompute(FEATS, hist, candidates(7, 2), 6500).cpu())


@settings(max_examples=10, deadline=None)
@example(action_mode="add", ops=["hit", "other", "hit", "append", "hit", "hit"])
@example(action_mode="interleave", ops=["hit", "other", "hit", "version", "hit", "append", "hit"])
@given(
    action_mode=st.sampled_from(["add", "interleave"]),
    ops=st.lists(st.sampled_from(["hit", "hit", "append", "other", "invalidate", "version"]), min_size=3, max_size=9),
)
def test_layout_memos_never_go_stale(action_mode, ops):
    """A padded pass reuses the index arrays of its layout (``_pass_pieces``, ``window_ids``' layouts) and a window its
    prefix times (``window_ids``' times, by events object): repeated hits
    of a user, hits after an append, after the entry was evicted (another user's request in a cache that holds one
    user) or invalidated, and after a model-version change give bit for bit the scores of a twin scorer that rebuilds
    every array on every call, and the scores of a fresh scorer on the same history."""
    model = shared_model("causal", action_mode)
    page_bytes = make_scorer(model).cache.page_bytes
    # 6 pages of 4 tokens: either user fits (a has 2 + 9 events, b 2 + 11; x2 tokens "interleave"), both do not.
    memo, twin = (make_scorer(model, micro_batch=4, budget=6 * page_bytes, cuda_graphs=True) for _ in range(2))
    hist = {"a": events(9, 1000, seed=1), "b": events(11, 1000, seed=2)}
    new = {"a": hist["a"], "b": hist["b"]}
    t = 20_000
    for step, op in enumerate(ops):
        user = "b" if op == "other" else "a"
        if op == "append":
            extra = events(2, t, seed=10 + step)
            t = int(extra.timestamps[-1])
            hist["a"], new["a"] = hist["a"].concat(extra), (extra if new["a"] is None else new["a"].concat(extra))
        for scorer in (memo, twin):
            if op == "invalidate":
                scorer.invalidate("a")
            elif op == "version":
                scorer.model_version = f"v{step}"
        t += 7
        cands = candidates(6, seed=step % 2)
        twin._pass_layouts.clear()
        twin._window_layouts.clear()
        got = memo.score(user, FEATS, new[user], cands, t)
        want = twin.score(user, FEATS, new[user], cands, t)
        new[user] = None
        assert torch.equal(got, want), (op, step)
        fresh = make_scorer(model, micro_batch=4, cuda_graphs=True).score(user, FEATS, hist[user], cands, t)
        assert close(got, fresh), (op, step)
    assert memo.stats.padded_passes > 0 and len(memo._pass_layouts) > 0 and len(memo._window_layouts) > 0
    if ops[:2] == ["hit", "other"]:  # b's entry evicted a's
        assert memo.cache.stats().evictions > 0
