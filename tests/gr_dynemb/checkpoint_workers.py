"""Rank workers of the multi-rank dump tests in test_checkpoint.py (spawned ranks unpickle them by module name, so
they live in an importable module; the toy model, data and spawn helper are test_sharding_workers')."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.gr_dynemb.test_sharding_workers import (
    GLOBAL_BATCH,
    batch,
    constraints,
    loss_of,
    make_model,
    optimizers,
    shard_model,
)

ADMIT_AFTER = 3
STEPS = 4


def admission_constraints() -> dict:
    """The sharding tests' constraints with an Adam dynamic table that admits an id in its third batch."""
    _, dynamic_opt = optimizers("adam")
    cons = constraints()
    cons["dyn"].dynamic.optimizer = dynamic_opt
    cons["dyn"].dynamic.admit_after = ADMIT_AFTER
    return cons


def worker_two_lookups_dump(rank: int, world_size: int, tmp: Path) -> None:
    """Trains the sharded model with the dynamic table looked up twice per step (two batches before one backward,
    as the retrieval model looks its item table up for inputs and then for targets), dumps the dynamic table
    (``tmp/dumps``) and saves this shard's optimizer step, rows and admission counters (``tmp/shard<rank>.pt``)."""
    from gr_dynemb.distributed import dump_sharded

    static_opt, _ = optimizers("adam")
    dmp, _ = shard_model(make_model(0), world_size, static_opt, admission_constraints())
    per_rank = GLOBAL_BATCH // world_size
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    for step in range(STEPS):
        loss = loss_of(dmp(batch(step, lo, hi))) + loss_of(dmp(batch(100 + step, lo, hi)))
        loss.backward()
    dump_sharded(dmp, tmp / "dumps")
    shard = dmp.module.dynamic["dyn"]
    torch.save(
        {"step": shard.step, "rows": shard.table.export_to_host(), "counters": shard.counter.export_to_host()},
        tmp / f"shard{rank}.pt",
    )
