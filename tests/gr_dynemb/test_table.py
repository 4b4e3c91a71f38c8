"""The native CPU hash table against a Python dict twin, plus scores, eviction, growth, initializers and bad input."""

from __future__ import annotations

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
    RESERVED_KEYS,
    DynamicHashTable,
    DynamicTableConfig,
    InitializerConfig,
    TableFullError,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def table(dim: int = 4, state_dim: int = 0, **kw: object) -> DynamicHashTable:
    return DynamicHashTable(DynamicTableConfig(dim=dim, **kw), state_dim=state_dim)  # type: ignore[arg-type]


def contents(t: DynamicHashTable) -> dict[int, list[float]]:
    keys, values, _ = t.export()
    return {k: v for k, v in zip(keys.tolist(), values.tolist(), strict=True)}


@settings(max_examples=40, deadline=None, database=None)
@given(data=st.data())
def test_matches_a_dict_twin(data: st.DataObject) -> None:
    # Key pool with extremes and collisions of low bits; capacity small enough that growth happens.
    pool = data.draw(
        st.lists(st.integers(INT64_MIN + 2, INT64_MAX), min_size=1, max_size=300, unique=True), label="pool"
    )
    t = table(dim=3, state_dim=1, capacity=128, max_capacity=1 << 14, num_threads=2)
    twin: dict[int, list[float]] = {}
    for _ in range(data.draw(st.integers(1, 12))):
        op = data.draw(st.sampled_from(["find_or_insert", "insert_or_assign", "erase", "assign", "find"]))
        keys = data.draw(st.lists(st.sampled_from(pool), min_size=0, max_size=64))
        kt = torch.tensor(keys, dtype=torch.int64)
        if op == "find_or_insert":
            values, status = t.find_or_insert(kt)
            init = t.initial_rows(kt)
            for i, k in enumerate(keys):
                expect_new = k not in twin
                if expect_new:
                    twin[k] = init[i].tolist()
                assert values[i].tolist() == pytest.approx(twin[k])
                assert int(status[i]) == (INSERTED if expect_new else FOUND)  # a later duplicate finds the first
        elif op == "insert_or_assign":
            values = torch.randn(len(keys), 4)
            t.insert_or_assign(kt, values)
            for i, k in enumerate(keys):
                twin[k] = values[i].tolist()  # last duplicate wins: batches this small run in order
        elif op == "assign":
            values = torch.randn(len(keys), 4)
            found = t.assign(kt, values)
            for i, k in enumerate(keys):
                assert bool(found[i]) == (k in twin)
                if k in twin:
                    twin[k] = values[i].tolist()
        elif op == "erase":
            n = t.erase(torch.tensor(sorted(set(keys)), dtype=torch.int64))
            assert n == sum(k in twin for k in set(keys))
            for k in set(keys):
                twin.pop(k, None)
        else:
            values, found = t.find(kt)
            for i, k in enumerate(keys):
                assert bool(found[i]) == (k in twin)
                assert values[i].tolist() == pytest.approx(twin.get(k, [0.0] * 4))
        assert t.size() == len(twin)
    got = contents(t)
    assert got.keys() == twin.keys()
    for k, row in twin.items():
        assert got[k] == pytest.approx(row)


def test_duplicates_in_one_multithreaded_batch_insert_once() -> None:
    t = table(dim=2, capacity=1 << 12, max_capacity=1 << 20, num_threads=2)
    keys = torch.randint(0, 50_000, (200_000,))
    _, status = t.find_or_insert(keys)
    unique = keys.unique()
    assert t.size() == unique.numel()
    assert int((status == INSERTED).sum()) == unique.numel()
    _, found = t.find(keys)
    assert bool(found.all())


def test_growth_doubles_and_keeps_rows() -> None:
    t = table(dim=2, capacity=BUCKET_SIZE, max_capacity=BUCKET_SIZE * 64, max_load_factor=0.5)
    keys = torch.arange(1000)
    rows = torch.arange(2000, dtype=torch.float32).view(1000, 2)
    t.insert_or_assign(keys, rows)
    assert t.capacity() >= 2000 and t.capacity() & (t.capacity() - 1) == 0
    assert t.load_factor() <= 0.5
    values, found = t.find(keys)
    assert bool(found.all()) and torch.equal(values, rows)
    t.reserve(BUCKET_SIZE * 1000)  # past max_capacity: clamped there
    assert t.capacity() == BUCKET_SIZE * 64


def test_initializers_are_per_key_and_seeded() -> None:
    keys = torch.arange(20_000)
    normal = table(dim=8, initializer=InitializerConfig("normal", mean=0.5, std=2.0, seed=3))
    rows = normal.initial_rows(keys)
    assert abs(rows.mean().item() - 0.5) < 0.05 and abs(rows.std().item() - 2.0) < 0.05
    # Same key, same row: another table, another batch order, another thread count.
    other = table(dim=8, initializer=InitializerConfig("normal", mean=0.5, std=2.0, seed=3), num_threads=1)
    perm = torch.randperm(keys.numel())
    values, _ = other.find_or_insert(keys[perm])
    assert torch.equal(values, rows[perm])
    reseeded = table(dim=8, initializer=InitializerConfig("normal", mean=0.5, std=2.0, seed=4)).initial_rows(keys)
    assert not torch.equal(reseeded, rows)
    trunc = table(dim=8, initializer=InitializerConfig("truncated_normal", std=0.1)).initial_rows(keys)
    assert trunc.abs().max() <= 0.2 + 1e-6 and abs(trunc.std().item() - 0.088) < 0.01
    uni = table(dim=8, initializer=InitializerConfig("uniform", low=-1.0, high=3.0)).initial_rows(keys)
    assert uni.min() >= -1.0 and uni.max() < 3.0 and abs(uni.mean().item() - 1.0) < 0.05
    const = table(dim=8, state_dim=2, initializer=InitializerConfig("constant", value=0.25)).initial_rows(keys[:3])
    assert torch.equal(const, torch.tensor([[0.25] * 8 + [0.0] * 2] * 3))


def one_bucket(policy: str, **kw: object) -> DynamicHashTable:
    return table(dim=2, capacity=BUCKET_SIZE, max_capacity=BUCKET_SIZE, policy=policy, max_load_factor=1.0, **kw)


def test_lru_evicts_the_oldest_and_rejects_older_newcomers() -> None:
    t = one_bucket("lru")
    for step in range(BUCKET_SIZE):
        t.set_step(step + 10)
        t.find_or_insert(torch.tensor([step]))
    assert t.size() == BUCKET_SIZE
    t.set_step(1000)
    t.find(torch.tensor([0]), touch=True)  # key 0 is now the most recent: key 1 is the oldest
    _, status = t.find_or_insert(torch.tensor([777]))
    assert int(status[0]) == EVICTED and t.evicted_count == 1
    _, found = t.find(torch.tensor([0, 1, 777]))
    assert found.tolist() == [True, False, True]
    t.set_step(5)  # a newcomer older than every resident is rejected and gets the initializer's row, no slot
    values, status = t.find_or_insert(torch.tensor([888]))
    assert int(status[0]) == REJECTED and t.rejected_count == 1
    assert torch.equal(values, t.initial_rows(torch.tensor([888])))
    assert not bool(t.find(torch.tensor([888]))[1][0])


def test_lfu_counts_touches_and_erase_if_prunes_rare_keys() -> None:
    t = one_bucket("lfu")
    keys = torch.arange(BUCKET_SIZE)
    t.find_or_insert(keys)
    t.find_or_insert(keys[:10])
    t.find(keys[:5], touch=True)
    _, _, scores = t.export()
    exported, _, sc = t.export(score_at_least=2)
    assert sorted(exported.tolist()) == list(range(10))
    assert sorted(sc.tolist()) == [2] * 5 + [3] * 5
    _, status = t.find_or_insert(torch.tensor([9999]))  # score 1 cannot beat a resident's >= 1
    assert int(status[0]) == REJECTED
    assert t.erase_if(score_below=2) == BUCKET_SIZE - 10 and t.size() == 10
    assert scores.numel() == BUCKET_SIZE


def test_epoch_policies_pack_epoch_and_counter() -> None:
    t = one_bucket("epoch_lfu")
    t.set_epoch(3)
    t.find_or_insert(torch.tensor([1, 1, 1]))
    t.set_epoch(4)
    t.find_or_insert(torch.tensor([1]))  # a new epoch restarts the count
    _, _, scores = t.export()
    assert scores.tolist() == [(4 << 32) | 1]
    lru = one_bucket("epoch_lru")
    lru.set_epoch(2)
    lru.set_step(77)
    lru.find_or_insert(torch.tensor([5]))
    assert lru.export()[2].tolist() == [(2 << 32) | 77]


def test_custom_scores_decide_eviction() -> None:
    t = one_bucket("custom")
    keys = torch.arange(BUCKET_SIZE)
    t.find_or_insert(keys, scores=keys + 100)
    _, status = t.find_or_insert(torch.tensor([-1, -2]), scores=torch.tensor([50, 500]))
    assert status.tolist() == [REJECTED, EVICTED]
    assert not bool(t.find(torch.tensor([0]))[1][0])  # score 100 was the lowest
    with pytest.raises(ValueError, match="needs a score"):
        t.find_or_insert(torch.tensor([3]))


def test_no_eviction_policy_raises_when_full() -> None:
    t = one_bucket("none")
    t.find_or_insert(torch.arange(BUCKET_SIZE))
    with pytest.raises(TableFullError, match="policy='none' never evicts"):
        t.find_or_insert(torch.tensor([10_000]))


def test_accumulate_adds_duplicates() -> None:
    t = table(dim=2, state_dim=1)
    t.insert_or_assign(torch.tensor([4, 5]), torch.zeros(2, 3))
    found = t.accumulate(torch.tensor([4, 4, 6]), torch.ones(3, 3))
    assert found.tolist() == [True, True, False]
    assert t.find(torch.tensor([4, 5]))[0].tolist() == [[2.0, 2.0, 2.0], [0.0, 0.0, 0.0]]


def test_clear_and_extreme_keys() -> None:
    t = table()
    extremes = torch.tensor([INT64_MAX, INT64_MIN + 2, 0, -1])
    t.find_or_insert(extremes)
    assert bool(t.find(extremes)[1].all())
    t.clear()
    assert t.size() == 0 and not bool(t.find(extremes)[1].any())


@pytest.mark.parametrize("sentinel", RESERVED_KEYS)
def test_reserved_keys_are_rejected(sentinel: int) -> None:
    t = table()
    with pytest.raises(ValueError, match="reserved"):
        t.find_or_insert(torch.tensor([1, sentinel]))
    # The sentinel got no slot; the batch's other key was processed.
    assert t.size() == 1 and t.find(torch.tensor([1, sentinel]))[1].tolist() == [True, False]
    with pytest.raises(ValueError, match="reserved"):
        t.insert_or_assign(torch.tensor([sentinel, 2]), torch.zeros(2, t.value_dim))
    assert t.size() == 2
    t.insert_or_assign(torch.tensor([3]), torch.zeros(1, t.value_dim))  # the count does not leak into later calls


def test_lookups_report_reserved_keys_absent() -> None:
    # No slot can hold a sentinel, so lookups answer "absent" for it instead of scanning every batch on the host.
    t = table(dim=2)
    t.insert_or_assign(torch.tensor([5]), torch.ones(1, t.value_dim))
    keys = torch.tensor([RESERVED_KEYS[0], 5, RESERVED_KEYS[1]])
    values, found = t.find(keys)
    assert found.tolist() == [False, True, False] and not bool(values[[0, 2]].any())
    assert t.assign(keys, torch.zeros(3, t.value_dim)).tolist() == [False, True, False]
    assert t.erase(keys) == 1 and t.size() == 0


def test_bad_input_names_the_problem() -> None:
    t = table(dim=2)
    with pytest.raises(TypeError, match="int64"):
        t.find(torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"values must be \[2, 2\]"):
        t.insert_or_assign(torch.tensor([1, 2]), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="float32"):
        t.insert_or_assign(torch.tensor([1, 2]), torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="only given with policy='custom'"):
        t.find_or_insert(torch.tensor([1]), scores=torch.tensor([1]))
    with pytest.raises(ValueError, match="policy must be one of"):
        DynamicTableConfig(dim=2, policy="fifo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="low < high"):
        table(initializer=InitializerConfig("uniform", low=1.0, high=1.0))
    with pytest.raises(ValueError, match="max_capacity"):
        DynamicTableConfig(dim=2, capacity=1000, max_capacity=10)


def test_apply_optimizer_updates_present_rows_in_place() -> None:
    t = DynamicHashTable(DynamicTableConfig(dim=2, capacity=256), state_dim=4)  # adam: m and v after w
    rows = torch.tensor([[1.0, -1.0, 0.1, 0.2, 0.3, 0.4]])
    t.insert_or_assign(torch.tensor([7]), rows)
    g = torch.tensor([[0.5, -0.25], [1.0, 1.0], [2.0, 2.0]])
    found = t.apply_optimizer(torch.tensor([7, 8, RESERVED_KEYS[0]]), g, "adam", lr=0.1, step=3)
    assert found.tolist() == [True, False, False] and t.size() == 1
    w, m, v = rows[0, :2], rows[0, 2:4], rows[0, 4:6]
    m = 0.9 * m + 0.1 * g[0]
    v = 0.999 * v + 0.001 * g[0] * g[0]
    w = w - 0.1 * (m / (1 - 0.9**3)) / ((v / (1 - 0.999**3)).sqrt() + 1e-8)
    torch.testing.assert_close(t.find(torch.tensor([7]))[0][0], torch.cat([w, m, v]))


def test_apply_optimizer_bad_input() -> None:
    t = table(dim=2)  # no optimizer state in the rows
    with pytest.raises(ValueError, match="optimizer kind"):
        t.apply_optimizer(torch.tensor([1]), torch.zeros(1, 2), "lamb", lr=0.1)
    with pytest.raises(ValueError, match=r"grads must be float32 \[1, 2\]"):
        t.apply_optimizer(torch.tensor([1]), torch.zeros(1, 3), "sgd", lr=0.1)
    with pytest.raises(ValueError, match="state does not fit"):
        t.apply_optimizer(torch.tensor([1]), torch.zeros(1, 2), "adam", lr=0.1)
    with pytest.raises(ValueError, match="lr and eps"):
        t.apply_optimizer(torch.tensor([1]), torch.zeros(1, 2), "sgd", lr=0.0)
