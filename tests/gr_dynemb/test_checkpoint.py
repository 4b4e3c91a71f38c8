"""Dumps: full and incremental round trips, atomic files, wrong shapes; DynamicEmbedding state_dict; module dumps
carrying the optimizer step and admission counters (exact resume of a table looked up twice per step, re-sharding,
version 1 dumps)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from gr_dynemb import (
    DynamicEmbedding,
    DynamicEmbeddingConfig,
    DynamicHashTable,
    DynamicTableConfig,
    FusedOptimizerConfig,
    InitializerConfig,
)
from gr_dynemb.checkpoint import (
    LegacyDumpWarning,
    dump_embedding,
    dump_table,
    load_embedding,
    load_table,
    read_dump,
)


def rows(t: DynamicHashTable) -> dict[int, tuple[list[float], int]]:
    keys, values, scores = t.export()
    return {k: (v, s) for k, v, s in zip(keys.tolist(), values.tolist(), scores.tolist(), strict=True)}


def test_full_and_incremental_round_trip(tmp_path: Path) -> None:
    t = DynamicHashTable(DynamicTableConfig(dim=3, capacity=256, policy="lru"), state_dim=2)
    t.set_step(1)
    t.find_or_insert(torch.arange(100))
    full = tmp_path / "full.pt"
    assert dump_table(t, full) == 100
    t.set_step(7)
    t.insert_or_assign(torch.arange(90, 130), torch.randn(40, 5))  # 10 updated, 30 new
    inc = tmp_path / "inc.pt"
    assert dump_table(t, inc, since_score=7) == 40
    assert not list(tmp_path.glob("*.tmp"))

    restored = DynamicHashTable(DynamicTableConfig(dim=3, capacity=128, policy="lru"), state_dim=2)
    load_table(restored, full)
    load_table(restored, inc)
    assert rows(restored) == rows(t)  # rows and scores
    assert restored.step == 7 and read_dump(inc)["since_score"] == 7


def test_load_rejects_other_shapes_and_files(tmp_path: Path) -> None:
    t = DynamicHashTable(DynamicTableConfig(dim=3))
    path = tmp_path / "t.pt"
    dump_table(t, path)
    with pytest.raises(ValueError, match="dim 3"):
        load_table(DynamicHashTable(DynamicTableConfig(dim=4)), path)
    torch.save({"format": "other"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match=r"not a gr_dynemb\.table dump of a known version"):
        read_dump(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError):
        read_dump(tmp_path / "missing.pt")


def test_embedding_state_dict_round_trip() -> None:
    def make() -> DynamicEmbedding:
        cfg = DynamicEmbeddingConfig(DynamicTableConfig(dim=4, capacity=256), FusedOptimizerConfig("adam", lr=0.1))
        return DynamicEmbedding(cfg)

    a = make()
    for _ in range(3):
        a(torch.tensor([5, 6, 2**40])).sum().backward()
    b = make()
    b.load_state_dict(a.state_dict())
    assert b.step == a.step == 3
    assert rows(b.table) == rows(a.table)  # embeddings and Adam moments
    a(torch.tensor([5])).sum().backward()
    b(torch.tensor([5])).sum().backward()
    assert rows(b.table) == rows(a.table)  # training continues identically
    with pytest.raises(RuntimeError, match="Missing key"):
        make().load_state_dict({})


def test_reshard_dumps_from_two_ranks_to_three(tmp_path: Path) -> None:
    from gr_dynemb import owner_ranks
    from gr_dynemb.checkpoint import load_shards

    keys = torch.randint(-(2**62), 2**62, (3000,), generator=torch.Generator().manual_seed(0)).unique()
    values = torch.randn(keys.numel(), 2)
    old = []
    for rank in range(2):  # two old shards, each holding the keys routed to it
        t = DynamicHashTable(DynamicTableConfig(dim=2, capacity=4096))
        mine = owner_ranks(keys, 2) == rank
        t.insert_or_assign(keys[mine], values[mine])
        old.append(tmp_path / f"rank{rank}.pt")
        dump_table(t, old[-1])
    merged: dict[int, list[float]] = {}
    for rank in range(3):
        t = DynamicHashTable(DynamicTableConfig(dim=2, capacity=128))
        n = load_shards(t, old, rank=rank, world_size=3)
        got = rows(t)
        assert n == len(got) and all(owner_ranks(torch.tensor([k]), 3).item() == rank for k in got)
        merged.update({k: v for k, (v, _) in got.items()})
    expect = {k: v for k, v in zip(keys.tolist(), values.tolist(), strict=True)}
    assert merged.keys() == expect.keys()
    assert all(merged[k] == pytest.approx(expect[k]) for k in expect)
    shares = torch.bincount(owner_ranks(keys, 3), minlength=3).float() / keys.numel()
    assert bool((shares - 1 / 3).abs().max() < 0.05)  # the hash spreads keys evenly
    with pytest.raises(ValueError, match="rank < world_size"):
        load_table(t, old[0], rank=3, world_size=3)


# ---------------------------------------------------------------------------------------------------- module dumps
def adam_embedding(admit_after: int = 0) -> DynamicEmbedding:
    table = DynamicTableConfig(dim=4, capacity=256, initializer=InitializerConfig("normal", std=0.1, seed=3))
    return DynamicEmbedding(DynamicEmbeddingConfig(table, FusedOptimizerConfig("adam", lr=0.05), admit_after))


def two_lookup_step(emb: DynamicEmbedding, step: int) -> None:
    """One training step that looks the table up twice (inputs, then targets) before one backward: two optimizer
    steps per clock tick."""
    g = torch.Generator().manual_seed(step)
    inputs, targets = torch.randint(0, 12, (2, 6), generator=g)
    a, b = emb(inputs), emb(targets)
    (((a - b.flip(0)) ** 2).sum() + (a * torch.linspace(-1, 1, 4)).sum()).backward()


def one_lookup_step(emb: DynamicEmbedding, step: int) -> None:
    ids = torch.randint(0, 30, (10,), generator=torch.Generator().manual_seed(step))
    ((emb(ids) - 0.3) ** 2).sum().backward()


def test_table_looked_up_twice_per_step_resumes_exactly(tmp_path: Path) -> None:
    a = adam_embedding()
    for step in range(3):
        two_lookup_step(a, step)
    assert (a.step, a.table.step) == (6, 5)  # Adam's t runs ahead of the clock
    assert dump_embedding(a, tmp_path / "a.pt") == len(a.table) and read_dump(tmp_path / "a.pt")["optimizer_step"] == 6
    b = adam_embedding()
    load_embedding(b, tmp_path / "a.pt")
    assert b.step == 6 and rows(b.table) == rows(a.table)
    for step in range(3, 6):
        two_lookup_step(a, step)
        two_lookup_step(b, step)
        assert rows(b.table) == rows(a.table), f"step {step}: the resumed table left the continuing one"


def write_version1(payload: dict, path: Path) -> None:
    """A dump as the version 1 writer made it: no optimizer step, no admission counters."""
    old = {k: v for k, v in payload.items() if k not in ("optimizer_step", "admission")}
    torch.save({**old, "format": "gr_dynemb.table/1"}, path)


def test_version1_dump_falls_back_to_the_clock_and_warns(tmp_path: Path) -> None:
    a = adam_embedding(admit_after=2)
    for step in range(3):
        two_lookup_step(a, step)
    dump_embedding(a, tmp_path / "new.pt")
    write_version1(read_dump(tmp_path / "new.pt"), tmp_path / "v1.pt")
    assert read_dump(tmp_path / "v1.pt")["optimizer_step"] is None
    b = adam_embedding(admit_after=2)
    with pytest.warns(LegacyDumpWarning, match=r"step count resumes from the table clock.*admission counters start"):
        load_embedding(b, tmp_path / "v1.pt")
    assert b.step == a.table.step == 5 and rows(b.table) == rows(a.table)  # the version 1 reader's behaviour
    assert len(b.counter) == 0 < len(a.counter)
    sgd = DynamicEmbedding(DynamicEmbeddingConfig(DynamicTableConfig(dim=4), FusedOptimizerConfig("sgd", lr=0.1)))
    one_lookup_step(sgd, 0)
    dump_embedding(sgd, tmp_path / "sgd.pt")
    write_version1(read_dump(tmp_path / "sgd.pt"), tmp_path / "sgd1.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SGD without admission: nothing the fallback changes, so no warning
        load_embedding(sgd, tmp_path / "sgd1.pt")


def test_admission_counters_survive_a_dump(tmp_path: Path) -> None:
    a = adam_embedding(admit_after=3)
    for step in range(4):
        one_lookup_step(a, step)
    assert len(a.counter) > 0, "no id is waiting for admission: the test would not test anything"
    dump_embedding(a, tmp_path / "a.pt")
    b = adam_embedding(admit_after=3)
    one_lookup_step(b, 99)  # counters and rows of its own, which loading replaces
    load_embedding(b, tmp_path / "a.pt")
    assert rows(b.counter) == rows(a.counter) and rows(b.table) == rows(a.table) and b.step == a.step
    for step in range(4, 8):
        one_lookup_step(a, step)
        one_lookup_step(b, step)
    assert rows(b.counter) == rows(a.counter) and rows(b.table) == rows(a.table)  # the same ids admitted


def test_counters_and_step_follow_their_keys_across_shard_counts(tmp_path: Path) -> None:
    """Two shards (each fed the ids it owns, as the sharded collection routes them) dumped and loaded into one
    table equal one table trained on everything; loaded back onto two shards each keeps its own counters."""
    from gr_dynemb import owner_ranks

    whole, shards = adam_embedding(admit_after=3), [adam_embedding(admit_after=3) for _ in range(2)]
    keys = torch.randint(-(2**62), 2**62, (30,), generator=torch.Generator().manual_seed(4))
    for step in range(5):
        ids = keys[torch.randint(0, 30, (16,), generator=torch.Generator().manual_seed(step))]
        ((whole(ids) - 0.3) ** 2).sum().backward()
        for rank, shard in enumerate(shards):
            mine = ids[owner_ranks(ids, 2) == rank]
            assert mine.numel(), "every shard must step every step for the shards to equal the whole table"
            ((shard(mine) - 0.3) ** 2).sum().backward()
    paths = [tmp_path / f"rank{r}-of-2.pt" for r in range(2)]
    for shard, path in zip(shards, paths, strict=True):
        dump_embedding(shard, path)
    assert all(len(s.counter) for s in shards)
    merged = adam_embedding(admit_after=3)
    assert load_embedding(merged, paths) == len(whole.table)
    assert merged.step == whole.step == 5
    assert rows(merged.counter) == rows(whole.counter) and rows(merged.table) == rows(whole.table)
    dump_embedding(merged, tmp_path / "one.pt")
    for rank, shard in enumerate(shards):
        again = adam_embedding(admit_after=3)
        load_embedding(again, tmp_path / "one.pt", rank=rank, world_size=2)
        assert rows(again.counter) == rows(shard.counter) and rows(again.table) == rows(shard.table)
    one_lookup_step(shards[0], 9)  # now the shards disagree on the step count
    dump_embedding(shards[0], paths[0])
    with pytest.raises(ValueError, match="disagree on the optimizer step"):
        load_embedding(adam_embedding(admit_after=3), paths)
    dump_embedding(merged, tmp_path / "inc.pt", since_score=3)
    with pytest.raises(ValueError, match="full dumps"):
        load_embedding(merged, tmp_path / "inc.pt")


def test_two_rank_dumps_of_a_twice_looked_up_table_load_into_one_process(tmp_path: Path) -> None:
    """DMP on 2 gloo ranks, the dynamic table (Adam, admission) looked up twice per step; ``load_sharded`` into one
    process gets every shard's rows and admission counters and the optimizer step (2 per training step)."""
    from gr_dynemb import DynamicEmbeddingCollection, DynamicTable
    from gr_dynemb.distributed import load_sharded
    from tests.gr_dynemb.checkpoint_workers import STEPS, admission_constraints, worker_two_lookups_dump
    from tests.gr_dynemb.test_sharding_workers import DIM, optimizers, spawn

    spawn(2, worker_two_lookups_dump, tmp_path)
    saved = [torch.load(tmp_path / f"shard{r}.pt") for r in range(2)]
    assert [s["step"] for s in saved] == [2 * STEPS] * 2

    def union(part: str) -> dict[int, tuple[list[float], int]]:
        out: dict[int, tuple[list[float], int]] = {}
        for s in saved:
            keys, values, scores = s[part]
            out.update(zip(keys.tolist(), zip(values.tolist(), scores.tolist(), strict=True), strict=True))
        return out

    assert union("counters"), "no id is waiting for admission: the test would not test anything"
    _, adam = optimizers("adam")
    options = admission_constraints()["dyn"].dynamic
    coll = DynamicEmbeddingCollection([DynamicTable("dyn", ["d", "d_clicked"], options.embedding_config(DIM, adam))])
    loaded = load_sharded(coll, tmp_path / "dumps")
    emb = coll.table("dyn")
    assert loaded == {"dyn": len(emb.table)} and emb.step == 2 * STEPS
    assert rows(emb.counter) == union("counters") and rows(emb.table) == union("rows")


def test_state_dict_carries_admission_counters() -> None:
    from gr_dynemb import owner_ranks
    from gr_dynemb.distributed import DynamicEmbeddingShard

    a = adam_embedding(admit_after=3)
    for step in range(4):
        one_lookup_step(a, step)
    state = a.state_dict()
    assert len(a.counter) > 0 and state["admission_keys"].numel() == len(a.counter)
    b = adam_embedding(admit_after=3)
    one_lookup_step(b, 99)
    b.load_state_dict(state)
    assert rows(b.counter) == rows(a.counter) and rows(b.table) == rows(a.table)
    for step in range(4, 8):
        one_lookup_step(a, step)
        one_lookup_step(b, step)
    assert rows(b.counter) == rows(a.counter) and rows(b.table) == rows(a.table)  # the same ids admitted
    # A shard keeps the counters of the keys it owns, as it keeps their rows.
    state = a.state_dict()
    for rank in range(2):
        shard = DynamicEmbeddingShard(adam_embedding(admit_after=3).config, rank, 2)
        shard.load_state_dict(state)
        mine = {k: v for k, v in rows(a.counter).items() if owner_ranks(torch.tensor([k]), 2).item() == rank}
        assert rows(shard.counter) == mine
    # A state saved without counters loads with them empty, and says so; one with them does not fit a table without
    # admission; a state holding only some of the entries is refused.
    old = {k: v for k, v in state.items() if not k.startswith("admission_")}
    with pytest.warns(LegacyDumpWarning, match="no admission counters"):
        b.load_state_dict(old)
    assert len(b.counter) == 0 and rows(b.table) == rows(a.table)
    with pytest.raises(RuntimeError, match=r"Unexpected key.*admission_keys"):
        adam_embedding().load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"admission counters: \['admission_scores'\] missing"):
        b.load_state_dict({k: v for k, v in state.items() if k != "admission_scores"})
