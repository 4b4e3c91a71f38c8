"""Caching storage (gr_dynemb.caching): a host table holding every row with a small cache in front, against one table
holding the same keys. CPU tests use a CPU cache; the CUDA tests (gpu mark) a CUDA cache."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gr_dynemb import (
    BUCKET_SIZE,
    EVICTED,
    FOUND,
    INSERTED,
    REJECTED,
    CachingHashTable,
    DynamicEmbedding,
    DynamicEmbeddingConfig,
    DynamicHashTable,
    DynamicTableConfig,
    FusedOptimizerConfig,
    InitializerConfig,
    cuda_available,
    make_table,
)
from gr_dynemb.caching import cache_slots
from gr_dynemb.checkpoint import dump_table, load_table

OPTIMIZERS = ["sgd", "adagrad", "rowwise_adagrad", "adam"]


def needs_gpu(fn):
    skip = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device and gr_dynemb's CUDA build")
    return pytest.mark.gpu(skip(fn))


def table_config(dim: int, policy: str = "lru", cache: int | None = None, device: str = "cpu") -> DynamicTableConfig:
    return DynamicTableConfig(
        dim=dim, capacity=1 << 12, max_capacity=1 << 16, policy=policy, num_threads=2, device=device,
        initializer=InitializerConfig("uniform", low=-0.5, high=0.5, seed=3), cache_capacity=cache,
    )  # fmt: skip


def contents(t) -> dict[int, tuple[list[float], int]]:
    keys, values, scores = t.export_to_host()
    return {
        k: (v, s) for k, v, s in zip(keys.tolist(), values.tolist(), scores.view(torch.int64).tolist(), strict=True)
    }


def assert_close_contents(a, b) -> None:
    """Same keys and scores, rows equal to fp32 rounding (CUDA sums a batch's duplicate gradients in any order)."""
    ca, cb = contents(a), contents(b)
    assert ca.keys() == cb.keys()
    for k, (v, s) in cb.items():
        assert ca[k][1] == s, k
        assert ca[k][0] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def power_law_ids(n: int, id_space: int, gen: torch.Generator) -> torch.Tensor:
    """Skewed ids (P(rank) ~ 1/rank) spread over int64 by a fixed odd multiplier."""
    weights = 1.0 / torch.arange(1, id_space + 1, dtype=torch.float64)
    ranks = torch.multinomial(weights, n, replacement=True, generator=gen)
    return ranks * 0x1E3779B97F4A7C15 % (1 << 62) - (1 << 61)


def train_twins(
    optimizer: str, policy: str, dim: int, cache: int, steps: int, device: str = "cpu", seed: int = 0
) -> tuple[DynamicEmbedding, DynamicEmbedding]:
    """One DynamicEmbedding on a single CPU table and one on caching storage, trained on the same batches; every
    step's output must match exactly."""
    opt = FusedOptimizerConfig(kind=optimizer, lr=0.05)  # type: ignore[arg-type]
    single = DynamicEmbedding(DynamicEmbeddingConfig(table_config(dim, policy), opt))
    cached = DynamicEmbedding(DynamicEmbeddingConfig(table_config(dim, policy, cache, device), opt))
    assert isinstance(cached.table, CachingHashTable) and isinstance(single.table, DynamicHashTable)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = power_law_ids(300, 2000, gen).view(20, 15)
        weight = torch.randn(20, 15, dim, generator=gen)
        outs = []
        for module, dev in ((single, "cpu"), (cached, device)):
            out = module(ids.to(dev))
            (out * weight.to(dev)).sum().backward()
            outs.append(out.detach().cpu())
        if device == "cpu":
            assert torch.equal(outs[0], outs[1])
        else:
            torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    return single, cached


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_training_twin_with_a_small_cache(optimizer: str, policy: str) -> None:
    single, cached = train_twins(optimizer, policy, dim=6, cache=4 * BUCKET_SIZE, steps=25)
    table = cached.table
    assert table.misses > 0 and table.write_backs > 0  # the cache really evicted
    assert table.cache.size() <= 4 * BUCKET_SIZE < table.size()
    assert table.size() == single.table.size()
    assert contents(single.table) == contents(table)  # rows, optimizer states and scores, bit for bit
    assert single.unadmitted == cached.unadmitted == 0


@settings(max_examples=8, deadline=None)
@given(
    dim=st.sampled_from([1, 4, 9]),
    buckets=st.sampled_from([1, 2, 8]),
    optimizer=st.sampled_from(OPTIMIZERS),
    policy=st.sampled_from(["lru", "lfu", "epoch_lru", "epoch_lfu"]),
    seed=st.integers(0, 1000),
)
def test_training_twin_shapes(dim: int, buckets: int, optimizer: str, policy: str, seed: int) -> None:
    single, cached = train_twins(optimizer, policy, dim=dim, cache=buckets * BUCKET_SIZE, steps=6, seed=seed)
    assert contents(single.table) == contents(cached.table)


def test_evicted_rows_are_written_back_with_their_updates() -> None:
    t = make_table(table_config(4, "lru", cache=BUCKET_SIZE), state_dim=0)
    assert isinstance(t, CachingHashTable) and t.cache.capacity() == BUCKET_SIZE
    hot = torch.arange(1, 41)
    t.set_step(1)
    initial, status = t.find_or_insert(hot)
    assert (status == INSERTED).all()
    t.apply_optimizer(hot, torch.ones(40, 4), "sgd", lr=0.25)  # the updates land in the cache
    host_rows, _ = t.host.find(hot)
    assert torch.equal(host_rows, initial)  # the host copies are stale while cached
    for step in range(2, 8):  # other keys push the hot ones out of the one-bucket cache
        t.set_step(step)
        t.find_or_insert(torch.arange(1000 * step, 1000 * step + 100))
    _, in_cache = t.cache.find(hot)
    assert not in_cache.any() and t.write_backs >= 40
    host_rows, found = t.host.find(hot)  # written back on eviction (no flush)
    assert found.all() and torch.equal(host_rows, initial - 0.25)
    again, status = t.find_or_insert(hot)  # and loaded back from the host table
    assert (status == FOUND).all() and torch.equal(again, initial - 0.25)


def test_a_key_evicted_between_lookup_and_backward_gets_its_update() -> None:
    t = make_table(table_config(3, "lfu", cache=BUCKET_SIZE))
    first = torch.arange(1, 101)
    rows, _ = t.find_or_insert(first)
    for _ in range(3):  # a second lookup before the first one's backward: frequent keys take the cache
        t.find_or_insert(torch.arange(500, 640))
    _, cached = t.cache.find(first)
    assert not cached.all()
    found = t.apply_optimizer(first, torch.ones(100, 3), "sgd", lr=0.5)
    assert found.all()
    now, _ = t.find(first)
    assert torch.equal(now, rows - 0.5)


def test_flush_export_and_checkpoint_round_trips(tmp_path) -> None:
    single, cached = train_twins("adam", "lru", dim=5, cache=2 * BUCKET_SIZE, steps=10)
    table = cached.table
    stale = table.host.export()[0].numel()
    assert stale == table.size()
    written = table.flush()
    assert written == table.cache.size() > 0
    keys, values, scores = table.host.export()
    ref = contents(single.table)
    flushed = zip(keys.tolist(), values.tolist(), scores.view(torch.int64).tolist(), strict=True)
    assert {k: (v, s) for k, v, s in flushed} == ref
    # Incremental export (rows touched since step 8) equals the single table's.
    assert set(table.export(score_at_least=8)[0].tolist()) == set(single.table.export(score_at_least=8)[0].tolist())
    # Dump from the caching table, load into a fresh caching table and into a single table.
    dump_table(table, tmp_path / "t.pt")
    fresh = make_table(table_config(5, "lru", cache=2 * BUCKET_SIZE), state_dim=10)
    plain = make_table(table_config(5, "lru"), state_dim=10)
    assert load_table(fresh, tmp_path / "t.pt") == load_table(plain, tmp_path / "t.pt") == len(ref)
    assert contents(fresh) == contents(plain) == ref
    # state_dict: caching module -> caching and single modules; training continues identically.
    opt = FusedOptimizerConfig(kind="adam", lr=0.05)
    restored = DynamicEmbedding(DynamicEmbeddingConfig(table_config(5, "lru", 3 * BUCKET_SIZE), opt))
    restored.load_state_dict(cached.state_dict())
    assert contents(restored.table) == ref and restored.step == single.step
    ids = torch.arange(-50, 50)
    for module in (single, restored):
        module(ids).sum().backward()
    assert contents(restored.table) == contents(single.table)


def test_host_side_operations_match_a_single_table() -> None:
    """insert_or_assign, assign, accumulate, restore, erase, erase_if and find on a warm cache."""
    gen = torch.Generator().manual_seed(5)
    single = DynamicHashTable(table_config(3, "lfu"), state_dim=1)
    cached = make_table(table_config(3, "lfu", cache=BUCKET_SIZE), state_dim=1)
    for step in range(1, 6):
        ids = power_law_ids(200, 600, gen)
        for t in (single, cached):
            t.set_step(step)
        a, sa = single.find_or_insert(ids)
        b, sb = cached.find_or_insert(ids)
        assert torch.equal(a, b) and torch.equal(sa, sb)
    some = power_law_ids(60, 900, gen)
    rows = torch.randn(60, 4, generator=gen)
    assert torch.equal(single.insert_or_assign(some, rows), cached.insert_or_assign(some, rows))
    assert torch.equal(single.assign(some[:20], rows[:20] * 2), cached.assign(some[:20], rows[:20] * 2))
    assert torch.equal(single.accumulate(some[10:40], rows[10:40]), cached.accumulate(some[10:40], rows[10:40]))
    assert contents(single) == contents(cached)
    probe = torch.cat([some, torch.arange(10**6, 10**6 + 10)])
    for touch in (False, True):
        (va, fa), (vb, fb) = single.find(probe, touch=touch), cached.find(probe, touch=touch)
        assert torch.equal(va, vb) and torch.equal(fa, fb) and not fa[-10:].any()
    assert single.erase(some[:15]) == cached.erase(some[:15])
    assert single.size() == cached.size()
    assert single.erase_if(3) == cached.erase_if(3)
    keys, values, scores = single.export_to_host()
    assert torch.equal(single.restore(keys, values * 3, scores), cached.restore(keys, values * 3, scores))
    assert contents(single) == contents(cached)
    assert torch.equal(single.initial_rows(probe), cached.initial_rows(probe))
    cached.clear()
    assert cached.size() == 0 and cached.cache.size() == 0


def test_statuses_duplicates_and_reserved_keys() -> None:
    single = DynamicHashTable(table_config(2))
    cached = make_table(table_config(2, cache=BUCKET_SIZE))
    batch = torch.tensor([5, 9, 5, 11, 9, 5])
    for t in (single, cached):
        t.set_step(1)
    a, sa = single.find_or_insert(batch)
    b, sb = cached.find_or_insert(batch)
    assert torch.equal(a, b) and sa.tolist() == sb.tolist() == [INSERTED, INSERTED, FOUND, INSERTED, FOUND, FOUND]
    bad = torch.tensor([7, -(2**63), 9])
    with pytest.raises(ValueError, match="reserved"):
        single.find_or_insert(bad)
    with pytest.raises(ValueError, match="reserved"):
        cached.find_or_insert(bad)
    assert contents(single) == contents(cached)  # 7 was stored by both, the reserved key by neither
    assert 7 in contents(cached)


def test_full_host_table_rejects_and_evicts_like_a_single_table() -> None:
    """A full host table: keys it rejects get the initializer's row and no cache slot; keys it evicts leave the
    cache too."""
    cfg = dict(dim=2, capacity=2 * BUCKET_SIZE, max_capacity=2 * BUCKET_SIZE, max_load_factor=1.0, num_threads=1)
    single = DynamicHashTable(DynamicTableConfig(**cfg))
    cached = make_table(DynamicTableConfig(**cfg, cache_capacity=BUCKET_SIZE))
    ids = torch.arange(400)
    for t in (single, cached):
        t.set_step(1)
    a, sa = single.find_or_insert(ids)
    b, sb = cached.find_or_insert(ids)
    assert torch.equal(a, b) and torch.equal(sa, sb)
    rejected = ids[sa == REJECTED]
    assert rejected.numel() == 400 - 2 * BUCKET_SIZE and cached.rejected_count == rejected.numel()
    assert not cached.cache.find(rejected)[1].any()
    # Which keys the full table evicts for 10 newer ones (the single table tells); the cache is made to hold them.
    new = torch.arange(2000, 2010)
    held = set(single.export()[0].tolist())
    single.set_step(2)
    a, sa = single.find_or_insert(new)
    victims = torch.tensor(sorted(held - set(single.export()[0].tolist())))
    assert (sa == EVICTED).all() and victims.numel() == 10
    cached.cache.clear()  # it held clean copies only (no updates yet)
    assert (cached.find_or_insert(victims)[1] == FOUND).all() and cached.cache.find(victims)[1].all()
    cached.set_step(2)
    b, sb = cached.find_or_insert(new)
    assert torch.equal(a, b) and torch.equal(sa, sb)
    assert not cached.cache.find(victims)[1].any()  # evicted from the host table: gone from the cache too
    assert not cached.find(victims)[1].any()
    assert contents(single) == contents(cached) and cached.size() == single.size() == 2 * BUCKET_SIZE


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="cache_capacity must be positive"):
        DynamicTableConfig(dim=4, cache_capacity=0)
    with pytest.raises(ValueError, match="must not exceed max_capacity"):
        DynamicTableConfig(dim=4, capacity=128, max_capacity=256, cache_capacity=512)
    for policy in ("none", "custom"):
        with pytest.raises(ValueError, match="evict by"):
            DynamicTableConfig(dim=4, policy=policy, cache_capacity=128)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="set one of them"):
        DynamicTableConfig(dim=4, device="cuda", hbm_budget_bytes=1 << 20, cache_capacity=128)
    with pytest.raises(ValueError, match="make_table"):
        DynamicHashTable(DynamicTableConfig(dim=4, cache_capacity=128))
    with pytest.raises(ValueError, match=r"needs config\.cache_capacity"):
        CachingHashTable(DynamicTableConfig(dim=4))
    t = make_table(DynamicTableConfig(dim=4, cache_capacity=128))
    with pytest.raises(ValueError, match="custom"):
        t.find_or_insert(torch.arange(3), scores=torch.arange(3))
    with pytest.raises(TypeError, match="int64"):
        t.find_or_insert(torch.arange(3, dtype=torch.int32))
    assert DynamicTableConfig(dim=4, cache_capacity=128).storage == "caching"
    assert DynamicTableConfig(dim=4).storage == "host"


def test_collection_mixes_caching_and_single_tables() -> None:
    """A DynamicEmbeddingCollection with one caching table next to a single table trains like one of single tables
    (the caching table takes its own lookup, the others the grouped one)."""
    pytest.importorskip("torchrec")
    from torchrec import KeyedJaggedTensor

    from gr_dynemb import DynamicEmbeddingCollection, DynamicTable

    opt = FusedOptimizerConfig("adagrad", lr=0.2)

    def build(cache: int | None) -> DynamicEmbeddingCollection:
        return DynamicEmbeddingCollection(
            [
                DynamicTable("items", ["item"], DynamicEmbeddingConfig(table_config(4, "lru", cache), opt)),
                DynamicTable("users", ["user"], DynamicEmbeddingConfig(table_config(4, "lru"), opt)),
            ]
        )

    plain, mixed = build(None), build(BUCKET_SIZE)
    assert isinstance(mixed.table("items").table, CachingHashTable)
    gen = torch.Generator().manual_seed(4)
    for _ in range(8):
        items, users = power_law_ids(400, 3000, gen), power_law_ids(40, 100, gen)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["item", "user"], values=torch.cat([items, users]), lengths=torch.full((44,), 10)
        )
        outs = []
        for ec in (plain, mixed):
            out = ec(kjt)
            (out["item"].values().square().sum() + out["user"].values().sum()).backward()
            outs.append(torch.cat([out["item"].values(), out["user"].values()]).detach())
        assert torch.equal(outs[0], outs[1])
    assert mixed.table("items").table.write_backs > 0
    for name in ("items", "users"):
        assert contents(plain.table(name).table) == contents(mixed.table(name).table)


def test_sharding_options_carry_the_cache() -> None:
    pytest.importorskip("torchrec")
    from gr_dynemb.distributed import DynamicTableOptions

    cfg = DynamicTableOptions(capacity=1 << 10, cache_capacity=256).embedding_config(8, FusedOptimizerConfig("sgd"))
    assert cfg.table.storage == "caching"
    assert isinstance(DynamicEmbedding(cfg).table, CachingHashTable)


@given(st.integers(1, 1 << 22))
def test_cache_slots_are_whole_power_of_two_buckets_within_the_request(requested: int) -> None:
    slots = cache_slots(requested)
    buckets = slots // BUCKET_SIZE
    assert slots % BUCKET_SIZE == 0 and buckets & (buckets - 1) == 0
    assert slots <= max(requested, BUCKET_SIZE) < 2 * slots


def test_insert_or_assign_evicting_hands_out_the_victims() -> None:
    """The native op on a plain table: victims are what the table held (rows and scores), in batch order; given
    scores are taken under any policy."""
    t = DynamicHashTable(DynamicTableConfig(dim=2, capacity=128, max_capacity=128, max_load_factor=1.0), state_dim=1)
    t.set_step(1)
    old = torch.arange(1, 129)
    status, ek, _, _ = t.insert_or_assign_evicting(old, torch.randn(128, 3))
    assert ek.numel() == 0 and (status == INSERTED).all()
    before = contents(t)
    t.set_step(2)
    new = torch.arange(500, 520)
    status, ek, ev, es = t.insert_or_assign_evicting(new, torch.randn(20, 3))
    assert (status == EVICTED).all() and ek.numel() == 20 and len(set(ek.tolist())) == 20
    for k, v, s in zip(ek.tolist(), ev.tolist(), es.view(torch.int64).tolist(), strict=True):
        assert before[k] == (v, s)
    after = contents(t)
    assert not set(ek.tolist()) & after.keys() and set(new.tolist()) <= after.keys()
    status, ek, _, _ = t.insert_or_assign_evicting(torch.tensor([900]), torch.zeros(1, 3), torch.tensor([1]))
    assert status.tolist() == [REJECTED] and ek.numel() == 0  # score 1 beats no one (lowest is 1 or 2)
    _, found, scores = t.find_with_scores(torch.tensor([500, 900]), touch=True)
    assert found.tolist() == [True, False] and scores.view(torch.int64).tolist() == [2, 0]


def test_bench_tool_runs_and_records_both_modes(tmp_path: Path) -> None:
    """tools/bench_dynemb_caching.py, one tiny CPU run: caching and host records of both benches, a readable table."""
    path = Path(__file__).resolve().parents[2] / "tools" / "bench_dynemb_caching.py"
    spec = importlib.util.spec_from_file_location("bench_dynemb_caching", path)
    tool = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(tool)  # type: ignore[union-attr]
    out = tmp_path / "caching"
    sizes = ["--id-space", "4096", "--cache-rows", "256", "--keys", "512", "--dims", "8", "--alphas", "1.1"]
    assert tool.main([*sizes, "--warmup", "2", "--batches", "2", "--threads", "1", "--out", str(out)]) == 0
    records = json.loads(out.with_suffix(".json").read_text())["records"]
    got = {(r["bench"], r.get("op"), r["mode"]) for r in records}
    runs = [("lookup", "find_or_insert"), ("lookup", "find"), ("train_step", None)]
    assert got == {(b, op, m) for b, op in runs for m in ("caching", "host")}
    lookup = next(r for r in records if r.get("op") == "find_or_insert" and r["mode"] == "caching")
    assert 0 < lookup["hit_rate"] < 1 and lookup["bkv_per_s"] > 0 and lookup["warmup_batches"] >= 2
    assert "caching find_or_insert throughput" in out.with_suffix(".md").read_text()


# ---------------------------------------------------------------------------------------------------- CUDA


@needs_gpu
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_cuda_cache_training_twin(optimizer: str, policy: str) -> None:
    single, cached = train_twins(optimizer, policy, dim=8, cache=4 * BUCKET_SIZE, steps=20, device="cuda")
    assert cached.table.cache.is_cuda and cached.table.write_backs > 0
    assert_close_contents(single.table, cached.table)


@needs_gpu
def test_cuda_insert_or_assign_evicting_matches_cpu_key_by_key() -> None:
    cfg = dict(dim=3, capacity=128, max_capacity=128, max_load_factor=1.0, policy="lfu")
    cpu = DynamicHashTable(DynamicTableConfig(**cfg, num_threads=1), state_dim=2)
    gpu = DynamicHashTable(DynamicTableConfig(**cfg, device="cuda"), state_dim=2)
    gen = torch.Generator().manual_seed(2)
    keys = torch.randint(0, 2**62, (300,), generator=gen)
    for i in range(300):
        row = torch.randn(1, 5, generator=gen)
        score = torch.randint(1, 50, (1,), generator=gen)
        a = cpu.insert_or_assign_evicting(keys[i : i + 1], row, score)
        b = gpu.insert_or_assign_evicting(keys[i : i + 1].cuda(), row.cuda(), score.cuda())
        assert torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu()) and torch.equal(a[2], b[2].cpu())
        assert torch.equal(a[3].view(torch.int64), b[3].view(torch.int64).cpu())
    va, fa, sa = cpu.find_with_scores(keys, touch=True)
    vb, fb, sb = gpu.find_with_scores(keys.cuda(), touch=True)
    assert torch.equal(va, vb.cpu()) and torch.equal(fa, fb.cpu())
    assert torch.equal(sa.view(torch.int64), sb.view(torch.int64).cpu())


@needs_gpu
def test_cuda_caching_matches_hybrid_and_round_trips(tmp_path) -> None:
    opt = FusedOptimizerConfig(kind="rowwise_adagrad", lr=0.1)
    cfg = table_config(16, "lru", device="cuda")
    cfg.hbm_budget_bytes = 4 * BUCKET_SIZE * 17 * 4
    hybrid = DynamicEmbedding(DynamicEmbeddingConfig(cfg, opt))
    cached = DynamicEmbedding(DynamicEmbeddingConfig(table_config(16, "lru", 4 * BUCKET_SIZE, "cuda"), opt))
    gen = torch.Generator().manual_seed(9)
    for _ in range(15):
        ids = power_law_ids(1000, 5000, gen).cuda()
        outs = [m(ids) for m in (hybrid, cached)]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
        for out in outs:
            out.square().sum().backward()
    assert cached.table.write_backs > 0 and cached.table.size() == hybrid.table.size()
    assert_close_contents(hybrid.table, cached.table)
    dump_table(cached.table, tmp_path / "c.pt")
    fresh = make_table(table_config(16, "lru", 2 * BUCKET_SIZE, "cuda"), state_dim=1)
    load_table(fresh, tmp_path / "c.pt")
    assert contents(fresh) == contents(cached.table)
