"""The one-lookup training step sharded (CPU, gloo, 2 ranks): ``RetrievalModel.training_forward`` (inputs and targets
in one call of the row-wise sharded item table) with in-batch negatives gathered from the targets' rows, run through
``gr_parallel.TrainPipeline`` (its ``sparse_features`` prefetching that one KJT) and through the plain loop, equals
single-process training in which the table takes ONE Adagrad step per training step: TorchRec's fused Adagrad thus
updates once per step (a lookup per call would add a step and change every touched row). A gr-dynemb table sharded
row-wise (its own fused Adam) trains like the single-process one looking the global batch up once per step. With
``ParallelizeConfig(qcomms="fp16")`` the same step runs with the looked-up rows and their gradients in fp16 on the
all-to-alls (TorchRec's quantized comms; gloo has no bf16 codec): within fp16 rounding of the fp32 run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from gr_models.data.batching import SequenceBatch
from gr_models.retrieval.losses import SampledSoftmaxLoss
from gr_models.retrieval.model import RetrievalModel
from tests.gr_parallel.ckpt_workers import build, global_loss, run
from tests.gr_parallel.parity_workers import DENSE_LR, NUM_ITEMS, TABLE_LR, item_rows, local_batch, make_model

STEPS = 4
NEGATIVES = 5
TOL = 1e-5


def loss_fn() -> SampledSoftmaxLoss:
    return SampledSoftmaxLoss(NUM_ITEMS, num_negatives=NEGATIVES, temperature=0.1, negatives="in_batch")


def rank_loss(model: RetrievalModel, batch: SequenceBatch, features: Any, step: int, dp_rank: int, total: int):
    """This DP rank's share of the global mean loss; its in-batch negatives drawn from a seed of (step, rank).
    ``features=None``: the two-lookup step (inputs through the forward, then the targets through the table)."""
    if features is None:
        queries = model(batch)
        torch.manual_seed(1000 * step + dp_rank)
        mean = loss_fn()(queries, batch.target_items, model.item_embeddings)
    else:
        queries, target_emb, _ = model.training_forward(batch, features)
        torch.manual_seed(1000 * step + dp_rank)
        mean = loss_fn()(queries, batch.target_items, target_embeddings=target_emb)
    return mean * (batch.target_items.numel() / total)


def global_tokens(step: int, dp_size: int) -> int:
    return sum(local_batch(step, r, dp_size)[0].target_items.numel() for r in range(dp_size))


@dataclass
class OneLookupBatch:
    batch: SequenceBatch
    features: Any  # model.training_features(batch): what the pipeline prefetches and the forward looks up
    step: int

    def to(self, device: torch.device, non_blocking: bool = False) -> OneLookupBatch:
        return OneLookupBatch(
            self.batch.to(device, non_blocking=non_blocking),
            self.features.to(device, non_blocking=non_blocking),
            self.step,
        )


def worker_one_lookup(ctx, modes: list[str]) -> dict[str, dict[str, float]]:
    """Per mode, the max abs differences to the single-process reference (floats: tensors do not travel back)."""
    wants = {table: train_reference(ctx.dp_size, table) for table in ("static", "dynamic")}
    out = {}
    for mode in modes:
        want = wants["dynamic" if mode.startswith("dynamic") else "static"]
        got = train_sharded(ctx, mode)
        out[mode] = {
            "loss": max(abs(a - b) for a, b in zip(got["losses"], want["losses"], strict=True)),
            "first_loss": abs(got["losses"][0] - want["losses"][0]),
            "rows": float((got["rows"] - want["rows"]).abs().max()),
            "dense": max(float((got["dense"][n] - w).abs().max()) for n, w in want["dense"].items()),
        }
    return out


def build_qcomms(ctx):
    """``build``'s sharded model with fp16 all-to-alls of the looked-up rows and their gradients."""
    from gr_parallel.dense import DenseOptimizerConfig
    from gr_parallel.parallelize import EmbeddingOptimizerConfig, ParallelizeConfig, parallelize

    config = ParallelizeConfig(
        embedding_optimizer=EmbeddingOptimizerConfig("adagrad", lr=TABLE_LR),
        dense_optimizer=DenseOptimizerConfig(lr=DENSE_LR, weight_decay=0.01),
        grad_clip=0.5,
        qcomms="fp16",
    )
    return parallelize(make_model("static"), ctx, config)


def train_sharded(ctx, mode: str) -> dict[str, Any]:
    """``mode``: "pipeline" or "plain" (one-lookup step), "two_lookups" (plain loop, the table called twice),
    "qcomms" (plain one-lookup loop, fp16 embedding all-to-alls), "dynamic" (pipelined one-lookup step, a gr-dynemb
    table sharded row-wise with its own Adam)."""
    from gr_parallel.pipeline import TrainPipeline

    # Row-wise; static: fused Adagrad; AdamW dense, clipping at 0.5.
    pm = build_qcomms(ctx) if mode == "qcomms" else build(ctx, "dynamic" if mode.startswith("dynamic") else "static")
    net = pm.module

    def batches():
        for step in range(STEPS):
            batch, _ = local_batch(step, ctx.dp_rank, ctx.dp_size)
            yield OneLookupBatch(batch, net.training_features(batch), step)

    def forward(ob: OneLookupBatch) -> torch.Tensor:
        features = None if mode == "two_lookups" else ob.features
        return rank_loss(net, ob.batch, features, ob.step, ctx.dp_rank, global_tokens(ob.step, ctx.dp_size))

    losses = []
    if mode in ("pipeline", "dynamic"):

        def before_step() -> None:
            pm.sync_grads()
            pm.clip_grad_norm_()

        pipeline = TrainPipeline(
            pm.dmp,
            pm.optimizer,
            ctx.device,
            forward=forward,
            sparse_features=lambda ob: {"item_embeddings": ob.features},
            before_step=before_step,
            zero_grad=pm.zero_grad,
        )
        it = batches()
        losses = [global_loss(pipeline.progress(it), ctx) for _ in range(STEPS)]
        pipeline.reset()
    else:
        for ob in batches():
            loss = forward(ob.to(ctx.device))
            loss.backward()
            pm.step()
            losses.append(global_loss(loss, ctx))
    rows = item_rows(net)
    dense = {
        n: p.detach().cpu().clone() for n, p in net.named_parameters() if id(p) in {id(q) for q in pm.dense_params}
    }
    return {"losses": losses, "rows": rows, "dense": dense}


def train_reference(dp_size: int, item_table: str = "static") -> dict[str, Any]:
    """One process, the DP ranks' losses summed; a static table with torch Adagrad (one step per training step), a
    dynamic one with its own fused Adam (one step per lookup call, here one per training step)."""
    model = make_model(item_table)
    table = model.input_embedding.item_embeddings.embeddings["item_table"].weight if item_table == "static" else None
    dense = [p for p in model.parameters() if p is not table]
    opt = torch.optim.AdamW(dense, lr=DENSE_LR, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)
    table_opt = torch.optim.Adagrad([table], lr=TABLE_LR, eps=1e-8) if table is not None else None
    losses = []
    for step in range(STEPS):
        # ONE lookup for the global batch (the ranks' sequences in rank order), then each rank's loss on its slice
        # with its own in-batch draw: a dynamic table's fused Adam steps once, as on the sharded ranks.
        queries, target_emb, _ = model.training_forward(local_batch(step, 0, 1)[0])
        total = queries.size(0)
        loss, start = 0.0, 0
        for r in range(dp_size):
            targets = local_batch(step, r, dp_size)[0].target_items
            part = slice(start, start + targets.numel())
            start += targets.numel()
            torch.manual_seed(1000 * step + r)
            mean = loss_fn()(queries[part], targets, target_embeddings=target_emb[part])
            loss = loss + mean * (targets.numel() / total)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dense, 0.5)
        opt.step()
        opt.zero_grad()
        if table_opt is not None:
            table_opt.step()
            table_opt.zero_grad()
        losses.append(float(loss.detach()))
    names = {id(p): n for n, p in model.named_parameters()}
    return {"losses": losses, "rows": item_rows(model), "dense": {names[id(p)]: p.detach() for p in dense}}


def test_one_lookup_step_sharded_equals_single_process_with_one_table_step() -> None:
    want = train_reference(dp_size=2)
    moved = float((want["rows"] - item_rows(make_model("static"))).abs().max())
    assert moved > 1e-3, "the item rows barely trained: the comparison would be vacuous"
    for rank_result in run(
        2, worker_one_lookup, ["pipeline", "plain", "two_lookups", "qcomms", "dynamic", "dynamic_plain"]
    ):
        for mode in ("pipeline", "plain", "dynamic", "dynamic_plain"):
            diffs = rank_result[mode]
            assert all(v <= TOL for v in diffs.values()), (mode, rank_result)
        # The table called twice per step takes two fused Adagrad steps: same first loss, other rows.
        two = rank_result["two_lookups"]
        assert two["first_loss"] <= TOL and two["rows"] > 1e-4, two
        # fp16 comms: rows and gradients rounded on the wire, so not bit-equal; losses within fp16 rounding, and
        # parameters within a fraction of one step (Adagrad's and Adam's normalised updates turn the rounding of
        # near-zero gradients into up to lr-sized moves: lr 0.05 table, 5e-3 dense).
        q = rank_result["qcomms"]
        assert 0 < q["rows"] <= 5e-3 and q["loss"] <= 1e-3 and q["dense"] <= 5e-3, q


def test_qcomms_precision_is_checked() -> None:
    from gr_parallel.parallelize import ParallelizeConfig

    with pytest.raises(ValueError, match="qcomms must be None, 'bf16' or 'fp16'"):
        ParallelizeConfig(qcomms="int8")
