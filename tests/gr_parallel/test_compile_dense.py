"""``ParallelizeConfig(compile_dense=...)`` (CPU, gloo, 2 DP ranks): the parity harness's tiny HSTU retrieval model
trained through ``parallelize`` with its HSTU blocks compiled (Inductor; ``True`` = whole blocks, ``"projections"`` =
their dense parts) equals the same training with eager blocks (losses, every item row, every dense parameter),
compiles on the first step(s) and never again on the following steps' differently sized jagged batches; tp > 1,
unknown scopes and models without an HSTU encoder are refused."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from tests.gr_parallel.ckpt_workers import run, snapshot, step_batches, train_plain
from tests.gr_parallel.parity_workers import DENSE_LR, TABLE_LR, make_model

STEPS = 4
TOL = 1e-5


def _frames() -> int:
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


def _train(ctx, compile_dense: bool | str) -> dict[str, Any]:
    from gr_models.modules.compile import compiled_scope, hstu_blocks
    from gr_parallel.dense import DenseOptimizerConfig
    from gr_parallel.parallelize import EmbeddingOptimizerConfig, ParallelizeConfig, parallelize

    config = ParallelizeConfig(
        embedding_optimizer=EmbeddingOptimizerConfig("adagrad", lr=TABLE_LR),
        dense_optimizer=DenseOptimizerConfig(lr=DENSE_LR, weight_decay=0.01),
        grad_clip=0.5,
        compile_dense=compile_dense,
    )
    pm = parallelize(make_model("static"), ctx, config)
    blocks = hstu_blocks(pm.module)
    assert blocks and all(compiled_scope(b) == config.compile_scope for b in blocks)
    losses, new_frames = [], []
    for sb in step_batches(ctx, 0, STEPS):
        before = _frames()
        losses += train_plain(pm, ctx, iter([sb]))
        new_frames.append(_frames() - before)
    return {"losses": losses, "state": snapshot(pm, ctx), "new_frames": new_frames}


def worker_compile_dense(ctx, compile_dense: bool | str) -> dict[str, Any]:
    """Max abs differences compiled vs eager (floats: tensors do not travel back) and the compiled run's new Dynamo
    frames per step."""
    eager = _train(ctx, compile_dense=False)
    compiled = _train(ctx, compile_dense=compile_dense)
    initial = _initial(ctx)
    moved = max(float((v - initial[k]).abs().max()) for k, v in eager["state"].items())
    return {
        "loss": max(abs(a - b) for a, b in zip(compiled["losses"], eager["losses"], strict=True)),
        "state": max(float((compiled["state"][k] - v).abs().max()) for k, v in eager["state"].items()),
        "keys_equal": compiled["state"].keys() == eager["state"].keys(),
        "moved": moved,
        "eager_frames": eager["new_frames"],
        "compiled_frames": compiled["new_frames"],
    }


def _initial(ctx) -> dict[str, torch.Tensor]:
    """The untrained model's state in ``snapshot``'s form (so the test knows training moved the parameters)."""
    from gr_parallel.parallelize import ParallelizeConfig, parallelize

    return snapshot(parallelize(make_model("static"), ctx, ParallelizeConfig()), ctx)


# New Dynamo frames per step. projections: project and finish on step 1 (one frame each, shared by both blocks).
# block (True): the whole forward on step 1 (it would compile once more on the first batch with another max_seq_len;
# the harness's model (max_seq_len 12, relative bias rows padded to a multiple of 8, capped at 12) reaches its blocks
# with one max_seq_len in these steps).
FIRST_FRAMES = {True: [1, 0], "projections": [2, 0]}


@pytest.mark.parametrize("compile_dense", [True, "projections"])
def test_compile_dense_trains_like_eager_blocks_and_compiles_once(compile_dense: bool | str) -> None:
    for result in run(2, worker_compile_dense, compile_dense):
        assert result["keys_equal"], result
        assert result["moved"] > 1e-3, f"training barely moved the parameters: a vacuous comparison {result}"
        assert result["loss"] <= TOL and result["state"] <= TOL, result
        assert result["eager_frames"] == [0] * STEPS, result
        assert result["compiled_frames"] == FIRST_FRAMES[compile_dense] + [0] * (STEPS - 2), result


def test_compile_dense_refuses_tp_and_models_without_hstu() -> None:
    from gr_parallel.parallelize import ParallelizeConfig, compile_dense_blocks, parallelize

    fake_tp2 = SimpleNamespace(tp_size=2)  # the check comes before any collective
    with pytest.raises(ValueError, match="compile_dense supports tp=1 only"):
        parallelize(make_model("static"), fake_tp2, ParallelizeConfig(compile_dense=True))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="compile_dense supports tp=1 only"):
        parallelize(make_model("static"), fake_tp2, ParallelizeConfig(compile_dense="projections"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="compile_dense needs an HSTUEncoder"):
        compile_dense_blocks(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="compile_dense must be False, True"):
        ParallelizeConfig(compile_dense="whole")
    assert ParallelizeConfig().compile_dense is False and ParallelizeConfig().compile_scope is None
    assert ParallelizeConfig(compile_dense=True).compile_scope == "block"
    assert ParallelizeConfig(compile_dense="projections").compile_scope == "projections"


def test_config_scopes_are_compile_hstu_blocks_scopes() -> None:
    from gr_models.modules.compile import SCOPES
    from gr_parallel.parallelize import COMPILE_SCOPES

    assert set(COMPILE_SCOPES) == set(SCOPES)
