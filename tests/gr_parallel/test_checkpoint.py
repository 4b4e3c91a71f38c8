"""gr_parallel distributed checkpoints (CPU, gloo): exact resume on the same world size (train k, save, load into a
differently initialised model, train k more == train 2k straight: losses and every item row and dense parameter
bit for bit, RNG included), and a 2-rank checkpoint loaded on 1 and on 4 ranks (re-shard: static rows and their
Adagrad state through torch.distributed.checkpoint, dynamic rows through gr-dynemb dumps) gives the same rows and
dense state and the same next step as continuing on 2 ranks; so does a (tp=2, dp=1) checkpoint on (tp=1, dp=1) and
(tp=2, dp=2), and a (tp=1, dp=2) one on (tp=2, dp=2): TP-split weights and their Adam moments are gathered on save
and re-split on load. Static (fused Adagrad) and dynamic (Adam) item tables; the dynamic dumps carry the table's
optimizer step, and older checkpoints (version 1 dumps, the step in meta.json) still load;
incompatible models and unfinished directories are refused with the reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gr_dynemb.checkpoint import read_dump
from tests.gr_parallel.ckpt_workers import (
    run,
    worker_load_on_other_world,
    worker_load_reshard,
    worker_resume,
    worker_save_on_two_ranks,
)
from tests.gr_parallel.parity_workers import NUM_ITEMS

TABLES = ["static", "dynamic"]
K = 3  # steps before the save, and after it


@pytest.fixture(scope="module")
def two_rank_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs the 2-rank exact-resume checks and leaves the checkpoints the re-shard tests load."""
    tmp = tmp_path_factory.mktemp("ckpt")
    results = run(2, worker_save_on_two_ranks, tmp, TABLES, K)
    for table in TABLES:
        assert results[0][table]["losses"] == results[1][table]["losses"]
    return tmp


def test_exact_resume_and_layout(two_rank_checkpoints: Path) -> None:
    for table in TABLES:
        path = two_rank_checkpoints / f"reshard-{table}"
        meta = json.loads((path / "meta.json").read_text())
        assert (meta["world_size"], meta["tp_size"], meta["dp_size"]) == (2, 1, 2)
        assert meta["optimizers"] == ["dense"]
        assert sorted(p.name for p in (path / "rng").iterdir()) == ["rank0.pt", "rank1.pt"]
        assert (path / "dense.pt").is_file() and (path / "trainer.pt").is_file()
        assert (path / "dense_optim.pt").is_file()
        if table == "static":
            assert meta["tables"] == {"input_embedding.item_embeddings.embeddings.item_table.weight": [NUM_ITEMS, 16]}
            assert (path / "sparse" / ".metadata").is_file()
        else:
            assert list(meta["tables"]) == ["dynamic:item_table"] and "dynamic_steps" not in meta
            dumps = sorted((path / "dynamic" / "item_table").iterdir())
            assert [p.name for p in dumps] == ["rank0-of-2.pt", "rank1-of-2.pt"]
            # The dumps carry the optimizer step (one per table, the same on every shard), which runs ahead of the
            # table clock: the retrieval model looks its item table up more than once per step.
            steps = {(d["optimizer_step"], d["step"]) for d in map(read_dump, dumps)}
            assert len(steps) == 1 and (step := steps.pop())[0] > step[1] > 0, step
    assert not list(two_rank_checkpoints.glob("*.tmp-*")) and not list(two_rank_checkpoints.glob("*.old-*"))


def test_checkpoint_with_version1_dumps_and_steps_in_meta_still_loads(two_rank_checkpoints: Path) -> None:
    """Checkpoints written before gr-dynemb's dumps carried the optimizer step hold it in meta.json; rewritten into
    that form, the dynamic checkpoint still loads on 1 rank and takes the 2-rank run's next step."""
    new, old = two_rank_checkpoints / "reshard-dynamic", two_rank_checkpoints / "reshard-legacy"
    shutil.copytree(new, old)
    shutil.copy(two_rank_checkpoints / "expected-dynamic.pt", two_rank_checkpoints / "expected-legacy.pt")
    steps = set()
    for dump in (old / "dynamic" / "item_table").iterdir():
        payload = read_dump(dump)
        steps.add(payload.pop("optimizer_step"))
        assert payload.pop("admission") is None  # no admission in this model: only the step is at stake
        torch.save({**payload, "format": "gr_dynemb.table/1"}, dump)
    meta = json.loads((old / "meta.json").read_text())
    meta["dynamic_steps"] = {"item_table": steps.pop()}
    (old / "meta.json").write_text(json.dumps(meta))
    diffs = run(1, worker_load_reshard, two_rank_checkpoints, "dynamic", K, "legacy")
    assert diffs[0] <= 1e-5


@pytest.mark.parametrize("world_size", [1, 4])
def test_two_rank_checkpoint_loads_on_another_world_size(two_rank_checkpoints: Path, world_size: int) -> None:
    diffs = run(world_size, worker_load_on_other_world, two_rank_checkpoints, TABLES, K)
    cases = [*TABLES, "tp2"] + (["tp1->tp2"] if world_size == 4 else [])
    assert sorted(diffs[0]) == sorted(cases)
    for case in cases:
        assert max(d[case] for d in diffs) <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("table", TABLES)
def test_exact_resume_on_two_gpus(tmp_path: Path, table: str) -> None:
    """Over NCCL with the tables on the GPUs (within 1e-5: embedding backward kernels accumulate with atomics)."""
    results = run(2, worker_resume, tmp_path, table, K, backend="nccl")
    assert results[0]["losses"] == results[1]["losses"]
