"""Hybrid-parallel training equals single-process training (gloo, spawned ranks; workers in parity_workers.py).

20 steps of a tiny HSTU retrieval model, global batch split over DP ranks, TP groups reading the same slice: the
losses, the gradient norms before clipping, every dense parameter (TP shards gathered) and every item-table row
match the single-process run within 1e-5 (fp32), and every rank holds the same full model."""

from __future__ import annotations

import pytest
import torch

from tests.gr_parallel import parity_workers as pw


def run_parity(tmp_path, world: int, tp: int, item_table: str, table_sharding: str = "row_wise") -> dict[str, float]:
    pw.spawn(world, pw.worker_parity, tmp_path, tp, item_table, table_sharding)
    diffs = torch.load(tmp_path / "diffs.pt")
    print(f"world={world} tp={tp} {item_table} {table_sharding}: max abs diffs {diffs}")  # shown with pytest -s
    assert all(v <= pw.TOL for v in diffs.values()), diffs
    return diffs


@pytest.mark.parametrize("item_table", ["static", "dynamic"])
def test_dp2_matches_single_process(tmp_path, item_table):
    run_parity(tmp_path, world=2, tp=1, item_table=item_table)


@pytest.mark.parametrize("item_table", ["static", "dynamic"])
def test_tp2_matches_single_process(tmp_path, item_table):
    run_parity(tmp_path, world=2, tp=2, item_table=item_table)


@pytest.mark.parametrize("item_table", ["static", "dynamic"])
def test_tp2_dp2_matches_single_process(tmp_path, item_table):
    run_parity(tmp_path, world=4, tp=2, item_table=item_table)


@pytest.mark.parametrize("table_sharding", ["table_wise", "data_parallel"])
def test_dp2_table_constraints(tmp_path, table_sharding):
    """Per-table constraints: a table-wise sharded table, and a replicated (data-parallel) one that trains with the
    dense optimizer, both match the single process."""
    run_parity(tmp_path, world=2, tp=1, item_table="static", table_sharding=table_sharding)


def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    pw.spawn(2, pw.worker_bf16, tmp_path, 1)


@pytest.mark.gpu
@pytest.mark.parametrize(("tp", "item_table"), [(1, "static"), (2, "static"), (1, "dynamic"), (2, "dynamic")])
def test_nccl_matches_single_process(tmp_path, tp, item_table):
    """The same parity on 2 GPUs over NCCL (reference on the CPU): GPU reductions run in another order, so 1e-4."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    pw.spawn(2, pw.worker_parity, tmp_path, tp, item_table, "row_wise", 1e-4, backend="nccl")
    print(f"nccl tp={tp} {item_table}:", torch.load(tmp_path / "diffs.pt"))


@pytest.mark.gpu
@pytest.mark.parametrize("tp", [1, 2])
def test_nccl_megatron_ddp_matches_single_process(tmp_path, tp):
    """ParallelizeConfig.megatron_ddp: Megatron-Core DDP syncs the dense gradients; same parity."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    pw.spawn(2, pw.worker_parity, tmp_path, tp, "static", "row_wise", 1e-4, True, backend="nccl")
    print(f"nccl megatron_ddp tp={tp}:", torch.load(tmp_path / "diffs.pt"))
