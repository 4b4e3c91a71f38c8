"""Grouped training lookups (gr_dynemb.grouped) against each table's own lookup: same outputs, table contents
(rows, optimizer state, scores), steps and dropped-gradient counts over several steps, for mixed optimizers, ids
shared across tables, empty tables, evictions and rejections; reserved ids and bad groups; the CUDA tables too."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gr_dynemb import (
    RESERVED_KEYS,
    DynamicEmbedding,
    DynamicEmbeddingConfig,
    DynamicHashTable,
    DynamicTableConfig,
    FusedOptimizerConfig,
    InitializerConfig,
    cuda_available,
)
from gr_dynemb.grouped import grouped_train_lookup, lookup_tables
from gr_dynemb.table import MAX_GROUP_TABLES, TableFullError, apply_optimizer_group, find_or_insert_embeddings_group

KINDS = ["sgd", "adagrad", "rowwise_adagrad", "adam"]


def make(kind: str, dim: int, seed: int, small: bool = False, device: str = "cpu") -> DynamicEmbedding:
    # small: one 128-slot bucket that never grows, so a batch of new ids evicts and (LRU ties) rejects.
    cap = dict(capacity=128, max_capacity=128) if small else dict(capacity=256, max_capacity=4096)
    table = DynamicTableConfig(
        dim=dim, initializer=InitializerConfig("uniform", low=-1.0, high=1.0, seed=seed), device=device, **cap
    )
    return DynamicEmbedding(DynamicEmbeddingConfig(table, FusedOptimizerConfig(kind, lr=0.1)))


def contents(t: DynamicHashTable) -> dict[int, tuple[list[float], int]]:
    keys, values, scores = t.export_to_host()
    return {
        k: (v, s) for k, v, s in zip(keys.tolist(), values.tolist(), scores.view(torch.int64).tolist(), strict=True)
    }


def assert_same_tables(a: DynamicEmbedding, b: DynamicEmbedding) -> None:
    ca, cb = contents(a.table), contents(b.table)
    assert ca.keys() == cb.keys()
    for k, (v, s) in cb.items():
        assert ca[k][1] == s, k
        assert ca[k][0] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert a.step == b.step and a.unadmitted == b.unadmitted
    assert a.table.size() == b.table.size() and a.table.rejected_count == b.table.rejected_count


def run_both(specs, batches, device: str = "cpu") -> tuple[list[DynamicEmbedding], list[DynamicEmbedding]]:
    """The same tables twice; each step looks up grouped on one set and table by table (the old path) on the
    other, backpropagates the same loss, and checks outputs. On CUDA, gradients are summed with atomics (float
    sums in any order), so outputs agree to rounding there, exactly on the CPU."""
    tol = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=1e-5, atol=1e-6)
    grouped = [make(*s, device=device) for s in specs]
    single = [make(*s, device=device) for s in specs]
    gen = torch.Generator().manual_seed(7)
    for ids in batches:
        ids = [x.to(device) for x in ids]
        out_g = grouped_train_lookup(grouped, ids)
        out_s = [m._lookup_one(x) for m, x in zip(single, ids, strict=True)]
        weights = [torch.randn(o.shape, generator=gen).to(device) for o in out_s]
        for a, b in zip(out_g, out_s, strict=True):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, **tol)
        sum((o * w).sum() for o, w in zip(out_g, weights, strict=True)).backward()
        sum((o * w).sum() for o, w in zip(out_s, weights, strict=True)).backward()
        for a, b in zip(grouped, single, strict=True):
            assert_same_tables(a, b)
    return grouped, single


@settings(max_examples=25, deadline=None)
@given(
    tables=st.lists(st.tuples(st.sampled_from(KINDS), st.booleans()), min_size=1, max_size=5),
    pool=st.integers(1, 300),
    sizes=st.lists(st.integers(0, 60), min_size=5, max_size=5),
    steps=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_grouped_equals_per_table(tables, pool, sizes, steps, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    vocab = torch.randint(-(2**62), 2**62, (pool,), generator=gen)  # shared by all tables: ids repeat across them
    specs = [(kind, 4, t, small) for t, (kind, small) in enumerate(tables)]
    batches = [
        [vocab[torch.randint(pool, (sizes[(t + s) % 5],), generator=gen)] for t in range(len(tables))]
        for s in range(steps)
    ]
    run_both(specs, batches)


def test_evictions_rejections_and_shapes() -> None:
    gen = torch.Generator().manual_seed(3)
    # 200 new ids per step into a 128-slot table: evictions, then rejections (equal LRU scores); 2-D id tensors.
    batches = [
        [torch.randint(0, 2**40, (20, 10), generator=gen), torch.randint(0, 50, (3, 4, 5), generator=gen)]
        for _ in range(3)
    ]
    grouped, _ = run_both([("adam", 3, 0, True), ("adagrad", 3, 1, False)], batches)
    assert grouped[0].table.rejected_count > 0 and grouped[0].unadmitted > 0
    assert grouped[1].unadmitted == 0


def test_more_tables_than_one_native_call() -> None:
    gen = torch.Generator().manual_seed(5)
    n = MAX_GROUP_TABLES + 3  # two native calls per direction
    specs = [(KINDS[t % 4], 2, t, False) for t in range(n)]
    batches = [[torch.randint(0, 30, (7,), generator=gen) for _ in range(n)] for _ in range(2)]
    run_both(specs, batches)


def test_full_table_without_eviction_raises() -> None:
    cfg = DynamicTableConfig(dim=2, capacity=128, max_capacity=128, policy="none")
    full = DynamicEmbedding(DynamicEmbeddingConfig(cfg))
    with pytest.raises(TableFullError, match="policy='none' never evicts"):
        grouped_train_lookup([make("sgd", 2, 0), full], [torch.arange(3), torch.arange(300)])


def test_group_calls_check_their_arguments() -> None:
    tables = [DynamicHashTable(DynamicTableConfig(dim=2)) for _ in range(MAX_GROUP_TABLES + 1)]
    keys, out, status = torch.arange(4), torch.empty(4, 2), torch.empty(4, dtype=torch.int8)
    with pytest.raises(ValueError, match=f"1 to {MAX_GROUP_TABLES} tables"):
        find_or_insert_embeddings_group(tables, keys, [0] * MAX_GROUP_TABLES + [4, 4], out, status)
    with pytest.raises(ValueError, match="needs 3 bounds"):
        find_or_insert_embeddings_group(tables[:2], keys, [0, 4], out, status)
    with pytest.raises(ValueError, match="bounds end at 3, but there are 4 keys"):
        find_or_insert_embeddings_group(tables[:2], keys, [0, 1, 3], out, status)
    with pytest.raises(ValueError, match="nondecreasing"):
        find_or_insert_embeddings_group(tables[:3], keys, [0, 3, 2, 4], out, status)
    other = DynamicHashTable(DynamicTableConfig(dim=3))
    with pytest.raises(ValueError, match="share device and dim"):
        find_or_insert_embeddings_group([tables[0], other], keys, [0, 2, 4], out, status)
    found = torch.empty(4, dtype=torch.bool)
    sgd = ("sgd", 0.1, 1e-8, 0.9, 0.999, 1)
    with pytest.raises(ValueError, match="one optimizer per table"):
        apply_optimizer_group(tables[:2], keys, [0, 2, 4], out, [sgd], found)
    with pytest.raises(ValueError, match="optimizer kind must be one of"):
        apply_optimizer_group(tables[:2], keys, [0, 2, 4], out, [sgd, ("lamb", *sgd[1:])], found)
    with pytest.raises(ValueError, match="optimizer's state does not fit"):
        apply_optimizer_group(tables[:2], keys, [0, 2, 4], out, [sgd, ("adam", *sgd[1:])], found)


def test_lookup_tables_groups_what_it_can() -> None:
    def modules() -> list[DynamicEmbedding]:
        admit = DynamicEmbedding(DynamicEmbeddingConfig(DynamicTableConfig(dim=2), admit_after=2))
        evaluating = make("adam", 2, 3)
        evaluating.eval()
        return [make("sgd", 2, 0), admit, make("adagrad", 3, 1), make("adam", 2, 2), evaluating]

    together, alone = modules(), modules()
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        ids = [torch.randint(0, 20, (2, 5), generator=gen) for _ in together]
        out_t = lookup_tables(together, ids)
        out_a = [m(x) for m, x in zip(alone, ids, strict=True)]
        for a, b in zip(out_t, out_a, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        sum(o.sum() for o in out_t if o.requires_grad).backward()
        sum(o.sum() for o in out_a if o.requires_grad).backward()
        for a, b in zip(together, alone, strict=True):
            assert contents(a.table) == contents(b.table) and a.step == b.step and a.unadmitted == b.unadmitted
    with pytest.raises(TypeError, match="ids must be int64"):
        lookup_tables(together[:1], [torch.tensor([1.0])])


def test_reserved_id_raises_like_the_table() -> None:
    a, b = make("sgd", 2, 0), make("sgd", 2, 1)
    for bad in RESERVED_KEYS:
        with pytest.raises(ValueError, match=f"key {bad} is reserved"):
            grouped_train_lookup([a, b], [torch.tensor([1, 2]), torch.tensor([3, bad, 4])])
    assert a.table.size() == 2  # tables before the bad one are processed, as one table at a time would


def test_no_ids_and_no_grad() -> None:
    a, b = make("adam", 2, 0), make("adam", 2, 1)
    out = grouped_train_lookup([a, b], [torch.zeros(0, dtype=torch.int64), torch.zeros(2, 0, dtype=torch.int64)])
    assert out[0].shape == (0, 2) and out[1].shape == (2, 0, 2)
    with torch.no_grad():
        out = grouped_train_lookup([a, b], [torch.tensor([5]), torch.tensor([6, 6])])
    assert not out[0].requires_grad and a.table.size() == 1 and b.table.size() == 1


def test_bad_groups() -> None:
    a, b = make("sgd", 2, 0), make("sgd", 3, 1)
    ids = [torch.tensor([1]), torch.tensor([2])]
    with pytest.raises(ValueError, match="share table device, output device and dim"):
        grouped_train_lookup([a, b], ids)
    with pytest.raises(ValueError, match="only once"):
        grouped_train_lookup([a, a], ids)
    with pytest.raises(ValueError, match="one id tensor per module"):
        grouped_train_lookup([a], ids)
    with pytest.raises(TypeError, match="ids must be int64"):
        grouped_train_lookup([a], [torch.tensor([1], dtype=torch.int32)])
    a.eval()
    with pytest.raises(ValueError, match="training mode without admission"):
        grouped_train_lookup([a], ids[:1])


def test_find_or_insert_embeddings_is_the_embedding_part() -> None:
    cfg = DynamicTableConfig(dim=3, capacity=128, max_capacity=128, policy="none")
    a, b = DynamicHashTable(cfg, state_dim=4), DynamicHashTable(cfg, state_dim=4)
    keys = torch.arange(10, 20)
    values, status = a.find_or_insert(keys)
    out, status_b = torch.empty(10, 3), torch.empty(10, dtype=torch.int8)
    b.find_or_insert_embeddings(keys, out, status_b)
    assert torch.equal(out, values[:, :3]) and torch.equal(status, status_b)
    assert contents(a) == contents(b)
    with pytest.raises(ValueError, match=r"out must be a torch.float32 tensor of shape \[10, 3\]"):
        b.find_or_insert_embeddings(keys, torch.empty(10, 7), status_b)
    with pytest.raises(ValueError, match="status must be contiguous"):
        b.find_or_insert_embeddings(keys, out, torch.empty(20, dtype=torch.int8)[::2])
    with pytest.raises(ValueError, match="reserved"):
        b.find_or_insert_embeddings(torch.tensor([RESERVED_KEYS[0]]), out[:1], status_b[:1])


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device and gr_dynemb's CUDA build")
def test_grouped_equals_per_table_on_cuda() -> None:
    gen = torch.Generator().manual_seed(11)
    vocab = torch.randint(-(2**62), 2**62, (500,), generator=gen)
    # No full buckets: which keys a full bucket keeps depends on the order of concurrent inserts on a GPU.
    specs = [(k, 8, t, False) for t, k in enumerate(KINDS)]
    batches = [[vocab[torch.randint(500, (40 + 30 * t,), generator=gen)] for t in range(4)] for _ in range(4)]
    run_both(specs, batches, device="cuda")
