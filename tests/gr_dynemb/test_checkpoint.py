"""Dumps: full and incremental round trips, atomic files, wrong shapes; DynamicEmbedding state_dict."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gr_dynemb import (
    DynamicEmbedding,
    DynamicEmbeddingConfig,
    DynamicHashTable,
    DynamicTableConfig,
    FusedOptimizerConfig,
)
from gr_dynemb.checkpoint import dump_table, load_table, read_dump


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
    with pytest.raises(ValueError, match=r"not a gr_dynemb\.table/1 dump"):
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
