"""Dynamic tables in TorchRec's DistributedModelParallel on CPU/gloo: 2- and 4-rank sharded training of a model
mixing a static (TorchRec fused kernel) and a dynamic (gr_dynemb, sharded by key hash) table equals single-process
training of the same model; plans hold both kernels; state_dict and per-rank dumps round-trip and re-shard onto
another world size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.gr_dynemb.test_sharding_workers import (
    DIM,
    POOL,
    all_ids_batch,
    dumped_rows,
    dynamic_options,
    optimizers,
    spawn,
    worker_train_dump,
    worker_train_load,
    worker_train_state_dict,
)


def test_two_ranks_sgd_equal_single_process_and_state_dict_round_trips(tmp_path: Path) -> None:
    spawn(2, worker_train_state_dict, tmp_path, "sgd")


@pytest.fixture(scope="module")
def two_rank_adam_dumps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trains the model with Adam on 2 ranks (asserting parity with one process) and dumps its dynamic table."""
    tmp = tmp_path_factory.mktemp("two_rank_adam")
    spawn(2, worker_train_dump, tmp, "adam")
    assert sorted(p.name for p in (tmp / "dumps" / "dyn").iterdir()) == ["rank0-of-2.pt", "rank1-of-2.pt"]
    return tmp


def test_four_ranks_adam_equal_single_process_and_load_two_rank_dumps(two_rank_adam_dumps: Path) -> None:
    spawn(4, worker_train_load, two_rank_adam_dumps, "adam")


def test_two_rank_dumps_load_into_one_process(two_rank_adam_dumps: Path) -> None:
    from gr_dynemb import DynamicEmbeddingCollection, DynamicTable
    from gr_dynemb.distributed import load_sharded

    _, adam = optimizers("adam")
    coll = DynamicEmbeddingCollection(
        [DynamicTable("dyn", ["d", "d_clicked"], dynamic_options().embedding_config(DIM, adam))]
    )
    rows = dumped_rows(two_rank_adam_dumps / "dumps")
    assert 0 < rows <= POOL.numel()
    assert load_sharded(coll, two_rank_adam_dumps / "dumps") == {"dyn": rows}
    expected = torch.load(two_rank_adam_dumps / "expected.pt")
    kjt = all_ids_batch()
    jts = kjt.to_dict()
    from torchrec import KeyedJaggedTensor

    coll.eval()
    with torch.no_grad():
        out = coll(KeyedJaggedTensor.from_jt_dict({f: jts[f] for f in ("d", "d_clicked")}))
    for f in ("d", "d_clicked"):
        torch.testing.assert_close(out[f].values(), expected[f])
    assert coll.table("dyn").step == 4  # Adam's step count came back with the rows
