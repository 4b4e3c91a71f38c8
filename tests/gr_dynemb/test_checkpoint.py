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
