"""KVCache: paged storage round trips, LRU eviction under the budget, version invalidation, page reuse, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gr_models.inference import CacheCapacityError, KVCache
from gr_models.inference.bias import relative_bias_rows
from gr_models.inference.kv_cache import copy_rows_, select_rows
from gr_models.modules.hstu import HSTUConfig, concat_jagged
from gr_models.modules.relative_bias import RelativeBucketedTimeAndPositionBias

L, H, DQK, DV, PAGE = 2, 2, 3, 4, 4
PAGE_BYTES = L * PAGE * H * (DQK + DV) * 4


def make_cache(pages: int, page_size: int = PAGE, dtype: torch.dtype = torch.float32) -> KVCache:
    return KVCache(
        num_layers=L,
        num_heads=H,
        qk_dim=DQK,
        v_dim=DV,
        budget_bytes=pages * PAGE_BYTES * page_size // PAGE,
        page_size=page_size,
        dtype=dtype,
    )


def rows(seed: int, n: int, d: int) -> torch.Tensor:
    return torch.randn(L, n, H, d, generator=torch.Generator().manual_seed(seed))


def store(cache: KVCache, user: str, seed: int, n: int, version: str = "v1") -> tuple[torch.Tensor, torch.Tensor]:
    k, v = rows(seed, n, DQK), rows(seed + 1000, n, DV)
    cache.reserve(user, version, n)
    for layer in range(L):
        cache.write(user, layer, 0, k[layer], v[layer])
    return k, v


def test_round_trip_and_partial_writes():
    cache = make_cache(8)
    k, v = store(cache, "a", 0, 10)  # 3 pages, last one partly used
    got_k, got_v = cache.read("a")
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    assert torch.equal(cache.read("a", 5)[0], k[:, :5])
    # Grow and overwrite a tail spanning a page boundary: earlier rows are kept.
    cache.reserve("a", "v1", 13)
    k2, v2 = rows(7, 6, DQK), rows(8, 6, DV)
    for layer in range(L):
        cache.write("a", layer, 7, k2[layer], v2[layer])
    got_k, got_v = cache.read("a")
    assert torch.equal(got_k, torch.cat([k[:, :7], k2], 1)) and torch.equal(got_v, torch.cat([v[:, :7], v2], 1))
    assert len(cache.users()) == 1 and cache.stats().tokens == 13 and cache.stats().pages_used == 4


def test_budget_sets_pages_and_bytes():
    cache = make_cache(5)
    s = cache.stats()
    assert s.pages_total == 5 and s.page_bytes == PAGE_BYTES and s.bytes_capacity == 5 * PAGE_BYTES
    assert cache.k_pool.numel() * 4 + cache.v_pool.numel() * 4 == s.bytes_capacity
    store(cache, "a", 0, 5)
    assert cache.stats().bytes_used == 2 * PAGE_BYTES
    bf16 = make_cache(5, dtype=torch.bfloat16)
    assert bf16.stats().pages_total == 10  # half the bytes per page


def test_lru_eviction_under_budget():
    cache = make_cache(6)
    ka, _ = store(cache, "a", 0, 8)  # 2 pages
    store(cache, "b", 1, 8)
    kc, _ = store(cache, "c", 2, 8)  # pool full
    assert cache.lookup("a", "v1") is not None  # a is now most recent: b is the LRU
    kd, _ = store(cache, "d", 3, 5)
    assert "b" not in cache and cache.users() == ["c", "a", "d"]
    s = cache.stats()
    assert s.evictions == 1 and s.hits == 1 and s.pages_used == 6
    assert torch.equal(cache.read("a")[0], ka) and torch.equal(cache.read("c")[0], kc)
    assert torch.equal(cache.read("d")[0], kd)
    # One user growing to the whole pool evicts everybody else, and its own rows survive.
    cache.reserve("d", "v1", 24)
    assert cache.users() == ["d"] and cache.stats().evictions == 3
    assert torch.equal(cache.read("d", 5)[0], kd)


def test_capacity_error_evicts_nothing():
    cache = make_cache(3)
    store(cache, "a", 0, 4)
    with pytest.raises(CacheCapacityError, match="needs 13 tokens = 4 pages"):
        cache.reserve("b", "v1", 13)
    assert cache.users() == ["a"] and cache.stats().evictions == 0


def test_version_mismatch_invalidates():
    cache = make_cache(4)
    store(cache, "a", 0, 4, version="v1")
    store(cache, "b", 1, 4, version="v1")
    assert cache.lookup("a", "v2") is None
    s = cache.stats()
    assert s.invalidations == 1 and s.misses == 1 and "a" not in cache and s.pages_used == 1
    store(cache, "c", 2, 4, version="v2")
    assert cache.invalidate_other_versions("v2") == 1 and cache.users() == ["c"]
    assert cache.lookup("c", "v2") is not None and cache.stats().hits == 1


def test_invalidate_and_clear():
    cache = make_cache(4)
    store(cache, "a", 0, 4)
    assert cache.invalidate("a") and not cache.invalidate("a")
    store(cache, "b", 0, 9)
    cache.clear()
    assert len(cache) == 0 and cache.stats().pages_used == 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="below one page"):
        make_cache(0)
    with pytest.raises(ValueError, match="num_heads must be an int >= 1"):
        KVCache(num_layers=1, num_heads=0, qk_dim=1, v_dim=1, budget_bytes=1 << 20)
    with pytest.raises(TypeError, match="floating point"):
        KVCache(num_layers=1, num_heads=1, qk_dim=1, v_dim=1, budget_bytes=1 << 20, dtype=torch.int64)
    cache = make_cache(4)
    with pytest.raises(KeyError, match="no cache entry"):
        cache.read("nobody")
    store(cache, "a", 0, 4)
    with pytest.raises(IndexError, match=r"rows \[2, 6\) outside"):
        cache.write("a", 0, 2, rows(0, 4, DQK)[0], rows(0, 4, DV)[0])
    with pytest.raises(ValueError, match="k/v must be"):
        cache.write("a", 0, 0, rows(0, 2, DV)[0], rows(0, 2, DV)[0])
    with pytest.raises(IndexError, match="layer 2"):
        cache.write("a", 2, 0, rows(0, 2, DQK)[0], rows(0, 2, DV)[0])
    with pytest.raises(ValueError, match="num_tokens"):
        cache.reserve("a", "v1", -1)


def test_for_encoder_shapes():
    cfg = HSTUConfig(embedding_dim=16, num_blocks=3, num_heads=4, attention_dim=2, hidden_dim=5)
    cache = KVCache.for_encoder(cfg, budget_bytes=1 << 16, page_size=8)
    assert (cache.num_layers, cache.num_heads, cache.qk_dim, cache.v_dim) == (3, 4, 2, 5)


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 14), st.booleans()), min_size=1, max_size=40))
@example(ops=[(2, 0, False), (0, 13, False), (1, 9, False)])  # evicting an empty entry frees no page
def test_random_write_evict_rewrite_never_corrupts(ops):
    """Random reserve/write/invalidate traffic over a small pool: every cached user always reads back exactly what
    was last written for it, whatever pages it was given after others were evicted."""
    cache = make_cache(6)
    truth: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for step, (user_idx, n, drop) in enumerate(ops):
        user = f"u{user_idx}"
        if drop:
            cache.invalidate(user)
            truth.pop(user, None)
            continue
        truth[user] = store(cache, user, step, n)
        truth = {u: kv for u, kv in truth.items() if u in cache}  # evicted users are gone
        assert set(truth) == set(cache.users())
        for u, (k, v) in truth.items():
            got_k, got_v = cache.read(u)
            assert torch.equal(got_k, k) and torch.equal(got_v, v), u
        s = cache.stats()
        assert s.pages_used == sum(-(-k.shape[1] // PAGE) for k, _ in truth.values()) <= s.pages_total


def test_concat_jagged():
    a, b = torch.arange(5.0).view(5, 1), 10 + torch.arange(4.0).view(4, 1)
    out = concat_jagged(a, torch.tensor([0, 2, 2, 5]), b, torch.tensor([0, 1, 3, 4]))
    assert out.view(-1).tolist() == [0, 1, 10, 11, 12, 2, 3, 4, 13]


def test_relative_bias_rows_match_the_module():
    torch.manual_seed(0)
    bias = RelativeBucketedTimeAndPositionBias(max_seq_len=12, num_time_buckets=20)
    n = 9
    ts = torch.sort(torch.randint(0, 100_000, (n,))).values
    qts = ts + torch.randint(0, 5000, (n,))
    pos = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6, 6])
    square = bias(ts, qts, torch.tensor([0, n]), n, pos)[0, 0]
    got = relative_bias_rows(bias, ts, pos, qts[5:], pos[5:])
    assert torch.equal(got, square[5:])


def test_relative_bias_rows_take_per_row_keys():
    """Keys ``[n_q, n_k]`` (each query row its own sequence's keys): row ``i`` equals the one-sequence call on its
    keys, so one call serves the query rows of every sequence of a pass."""
    torch.manual_seed(1)
    bias = RelativeBucketedTimeAndPositionBias(max_seq_len=16, num_time_buckets=20)
    key_t = torch.sort(torch.randint(0, 100_000, (3, 10)), dim=1).values
    key_pos = torch.tensor([list(range(10)), [0, 1, 2, 3, 4, 5, 6, 6, 6, 6], [0, 1, 2, 3, 3, 3, 3, 3, 3, 3]])
    q_t, q_pos = torch.tensor([200_000, 150_000, 99_000]), torch.tensor([9, 6, 3])
    got = relative_bias_rows(bias, key_t, key_pos, q_t, q_pos)
    for i in range(3):
        assert torch.equal(got[i], relative_bias_rows(bias, key_t[i], key_pos[i], q_t[i : i + 1], q_pos[i : i + 1])[0])


def test_write_rows_and_slots_match_per_layer_writes():
    cache, ref = make_cache(8), make_cache(8)
    k, v = rows(0, 11, DQK), rows(1, 11, DV)
    for c in (cache, ref):
        c.reserve("a", "v1", 3)  # "a" takes page 0, so "u"'s pages are not the first ones
        c.reserve("u", "v1", 11)
    cache.write_rows("u", 0, k[:, :6], v[:, :6])
    cache.write_rows("u", 6, k[:, 6:], v[:, 6:])
    for layer in range(L):
        ref.write("u", layer, 0, k[layer], v[layer])
    assert torch.equal(cache.read("u")[0], k) and torch.equal(cache.read("u")[1], v)
    assert torch.equal(cache.k_pool, ref.k_pool) and torch.equal(cache.v_pool, ref.v_pool)
    slots = cache.slots("u", 2, 9)
    assert slots.device.type == "cpu" and torch.equal(cache.k_pool[:, slots], k[:, 2:9])
    with pytest.raises(ValueError, match="k/v must be"):
        cache.write_rows("u", 0, k[0], v[0])
    with pytest.raises(IndexError, match="outside user 'u'"):
        cache.write_rows("u", 8, k[:, :4], v[:, :4])
    with pytest.raises(KeyError, match="no cache entry"):
        cache.slots("nobody", 0, 1)


@settings(max_examples=30, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from("uvw"), st.integers(0, 14), st.booleans()), min_size=1, max_size=12))
def test_slots_follow_every_page_change(steps):
    """``slots`` keeps each entry's slot table between requests: after any sequence of reservations (growing,
    shrinking, evicting others) and invalidations it still names the pages the entry holds."""
    cache = make_cache(6)
    for user, n, drop in steps:
        if drop:
            cache.invalidate(user)
            continue
        cache.reserve(user, "v1", n)
        for other in cache.users():
            entry = cache.lookup(other, "v1")
            want = [p * PAGE + r for p in entry.pages for r in range(PAGE)][: entry.num_tokens]
            assert cache.slots(other, 0, entry.num_tokens).tolist() == want, (other, entry.pages)


@settings(max_examples=15, deadline=None)
@given(past=st.lists(st.integers(0, 6), min_size=1, max_size=4), seed=st.integers(0, 100))
def test_forward_into_keys_equals_forward_with_past(past, seed):
    """The block with a caller-laid-out key buffer equals ``forward_with_past`` (jagged concatenation per call),
    and leaves the new rows' K/V in the buffer."""
    from gr_models.modules.hstu import HSTUBlock

    g = torch.Generator().manual_seed(seed)
    cfg = HSTUConfig(embedding_dim=8, num_heads=2, max_seq_len=16, dropout=0.0)
    torch.manual_seed(seed)
    block = HSTUBlock(cfg).eval()
    new = [1 + (p + seed) % 3 for p in past]
    n_past, n_new = sum(past), sum(new)
    past_k, past_v = torch.randn(n_past, 2, 4, generator=g), torch.randn(n_past, 2, 4, generator=g)
    x = torch.randn(n_new, 8, generator=g)
    past_off = torch.tensor([0, *torch.tensor(past).cumsum(0).tolist()])
    q_off = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()])
    kv_off = past_off + q_off
    targets = torch.tensor([min(1, q) for q in new])
    want, want_k, want_v = block.forward_with_past(
        x, q_off, past_k, past_v, past_off, 16, None, num_targets=targets, max_q_len=max(new)
    )
    k_all, v_all = torch.full((n_past + n_new, 2, 4), float("nan")), torch.full((n_past + n_new, 2, 4), float("nan"))
    past_rows = torch.cat([torch.arange(kv_off[b], kv_off[b] + p) for b, p in enumerate(past)])
    key_rows = torch.cat([torch.arange(kv_off[b] + p, kv_off[b + 1]) for b, p in enumerate(past)])
    k_all[past_rows], v_all[past_rows] = past_k, past_v
    got = block.forward_into_keys(
        x, q_off, k_all, v_all, kv_off, key_rows, 16, None, num_targets=targets, max_q_len=max(new)
    )
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(k_all[key_rows], want_k) and torch.equal(v_all[key_rows], want_v)
    none = block.forward_into_keys(x, q_off, k_all, v_all, kv_off, key_rows, 16, None, need_output=False)
    assert none is None


@settings(max_examples=40, deadline=None)
@given(
    planes=st.integers(1, 4),
    slots=st.integers(1, 20),
    tail=st.sampled_from([(), (3,), (2, 5)]),
    picks=st.lists(st.integers(0, 19), min_size=0, max_size=30),
)
def test_select_rows_and_copy_rows_equal_index_select_and_index_copy_on_dim_1(planes, slots, tail, picks):
    pool = torch.randn(planes, slots, *tail)
    rows = torch.tensor([p % slots for p in picks], dtype=torch.int64)
    assert torch.equal(select_rows(pool, rows), pool.index_select(1, rows))
    unique = torch.unique(rows)  # index_copy_ with repeated rows keeps an unspecified one
    src = torch.randn(planes, unique.numel(), *tail)
    assert torch.equal(copy_rows_(pool.clone(), unique, src), pool.clone().index_copy_(1, unique, src))
