"""Rank workers of the train-pipeline, checkpoint and failure tests (no tests here: test_pipeline.py,
test_checkpoint.py and test_failures.py run them).

The model, data and loss are the parity harness's (``parity_workers``: tiny HSTU retrieval model, jagged global
batches sliced per DP rank, fixed negatives per global batch, summed sampled softmax / global token count), trained
through ``gr_parallel.parallelize`` with an Adagrad static table (so the fused optimizer has state to checkpoint) or a
dynamic table with its own Adam, and an AdamW dense optimizer. Ranks run under ``gr_parallel.launch.run_ranks``,
which returns their results. Run as a script (``python -m tests.gr_parallel.ckpt_workers crash``) it is the job the
failure test launches with torchrun.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchrec import KeyedJaggedTensor

from gr_models.data.batching import SequenceBatch
from tests.gr_parallel.parity_workers import DENSE_LR, TABLE_LR, item_rows, local_batch, loss_sum, make_model

JITTER = 0.01  # a loss factor drawn from the global RNG: the resumed run matches only if RNG states come back


# ------------------------------------------------------------------------------------------ running ranks
def run(
    world_size: int, worker: Callable, *args: Any, tp: int = 1, backend: str = "gloo", timeout_s: float = 600.0
) -> list[Any]:
    """``worker(ctx, *args)`` on ``world_size`` ranks (gloo, or nccl with a GPU per rank) with ``gr_parallel``
    initialised; the ranks' results."""
    from gr_parallel.launch import run_ranks

    return run_ranks(
        _with_context, world_size, worker, tp, backend, args, backend=backend, timeout_s=timeout_s, pg_timeout_s=120.0
    )


def _with_context(worker: Callable, tp: int, backend: str, args: tuple) -> Any:
    import gr_parallel

    ctx = gr_parallel.initialize(tp=tp, backend=backend)
    try:
        return worker(ctx, *args)
    finally:
        gr_parallel.destroy()


# ------------------------------------------------------------------------------------------ model and data
@dataclass
class StepBatch:
    """A training batch with its fixed negatives, movable as one (what a pipeline copies ahead)."""

    batch: SequenceBatch
    negatives: torch.Tensor
    step: int

    @property
    def features(self):  # the sparse input the pipeline prefetches
        return self.batch.features

    def to(self, device: torch.device, non_blocking: bool = False) -> StepBatch:
        return StepBatch(
            self.batch.to(device, non_blocking=non_blocking),
            self.negatives.to(device, non_blocking=non_blocking),
            self.step,
        )


def step_batches(ctx, start: int, stop: int) -> Iterator[StepBatch]:
    for step in range(start, stop):
        batch, negatives = local_batch(step, ctx.dp_rank, ctx.dp_size)
        yield StepBatch(batch, negatives, step)


def build(ctx, item_table: str, seed: int = 0):
    from gr_parallel.dense import DenseOptimizerConfig
    from gr_parallel.parallelize import EmbeddingOptimizerConfig, ParallelizeConfig, parallelize

    config = ParallelizeConfig(
        embedding_optimizer=EmbeddingOptimizerConfig("adagrad", lr=TABLE_LR),
        dense_optimizer=DenseOptimizerConfig(lr=DENSE_LR, weight_decay=0.01),
        grad_clip=0.5,
    )
    return parallelize(make_model(item_table, seed), ctx, config)


def step_loss(pm, ctx, sb: StepBatch, jitter: bool) -> torch.Tensor:
    from gr_parallel.dense import global_count

    loss = loss_sum(pm.module, sb.batch, sb.negatives) / global_count(sb.batch.target_items.numel(), ctx)
    if jitter:
        loss = loss * (1 + JITTER * torch.rand(()))
    return loss


def global_loss(loss: torch.Tensor, ctx) -> float:
    total = loss.detach().clone()
    dist.all_reduce(total, group=ctx.dp_group)
    return float(total)


def train_plain(pm, ctx, batches: Iterator[StepBatch], jitter: bool = False) -> list[float]:
    """The plain loop: copy, forward, backward, DP sync + clipping, dense step."""
    losses = []
    for sb in batches:
        sb = sb.to(ctx.device)
        pm.optimizer.zero_grad(set_to_none=True)
        loss = step_loss(pm, ctx, sb, jitter)
        loss.backward()
        pm.sync_grads()
        pm.clip_grad_norm_()
        pm.optimizer.step()
        losses.append(global_loss(loss, ctx))
    return losses


def snapshot(pm, ctx) -> dict[str, torch.Tensor]:
    """Every item row (a collective) and the dense parameters (single-device form), on the CPU."""
    from gr_parallel.tensor_parallel import full_dense_state_dict

    dense = {k: v.detach().cpu().clone() for k, v in full_dense_state_dict(pm.dmp, ctx).items() if "dynamic" not in k}
    return {"rows": item_rows(pm.module), **{f"dense.{k}": v for k, v in dense.items()}}


def tolerance(ctx) -> float:
    """Runs that must agree bit for bit on the CPU; on CUDA, kernels that accumulate with atomics (embedding
    backward) may round differently run to run."""
    return 0.0 if ctx.device.type == "cpu" else 1e-5


def assert_losses(got: list[float], want: list[float], ctx, what: str) -> None:
    tol = tolerance(ctx)
    assert len(got) == len(want), f"{what}: {len(got)} losses, {len(want)} expected"
    worst = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(got, want, strict=True))
    assert worst <= tol, f"{what}: losses {got} != {want}"


def assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str, atol: float = 0.0) -> None:
    assert sorted(got) == sorted(want), f"{what}: {sorted(got)} vs {sorted(want)}"
    for k in want:
        diff = float((got[k].double() - want[k].double()).abs().max()) if want[k].numel() else 0.0
        assert diff <= atol, f"{what}: {k} differs by {diff} (allowed {atol})"


# ------------------------------------------------------------------------------------------ pipeline
def worker_pipeline(ctx, item_table: str, steps: int) -> dict[str, Any]:
    """The pipeline trains exactly like the plain loop, with batch i+1 fetched, copied and its input dist started
    before batch i's forward."""
    from gr_parallel.pipeline import TrainPipeline

    plain_pm = build(ctx, item_table)
    plain = train_plain(plain_pm, ctx, step_batches(ctx, 0, steps))
    want = snapshot(plain_pm, ctx)

    pm = build(ctx, item_table)
    fetched: list[int] = []

    def counting(it: Iterator[StepBatch]) -> Iterator[StepBatch]:
        for sb in it:
            fetched.append(sb.step)
            yield sb

    ahead: list[tuple[int, int, bool]] = []  # (step, batches fetched at its forward, next batch's dist in flight)

    def forward(sb: StepBatch) -> tuple[torch.Tensor, float]:
        ahead.append((sb.step, len(fetched), pipeline._next is not None and bool(pipeline._next[1])))
        loss = step_loss(pm, ctx, sb, jitter=False)
        return loss, sb.step

    def before_step() -> None:
        pm.sync_grads()
        pm.clip_grad_norm_()

    pipeline = TrainPipeline(
        pm.dmp, pm.optimizer, ctx.device, forward=forward, before_step=before_step, zero_grad=pm.zero_grad
    )
    iterator = counting(step_batches(ctx, 0, steps))
    piped = []
    while True:
        try:
            loss, step = pipeline.progress(iterator)
        except StopIteration:
            break
        assert step == len(piped)
        piped.append(global_loss(loss, ctx))
    assert_losses(piped, plain, ctx, "pipeline vs plain loop")
    assert_equal(snapshot(pm, ctx), want, "pipeline vs plain loop", atol=tolerance(ctx))
    for step, n_fetched, in_flight in ahead:
        last = step == steps - 1
        assert n_fetched == (step + 1 if last else step + 2), f"step {step}: {n_fetched} batches fetched at forward"
        assert in_flight != last, f"step {step}: next batch's input dist in flight = {in_flight}"
    # A forward that does not look up the prefetched features is an error, not a silent fallback.
    bad = TrainPipeline(
        pm.dmp, pm.optimizer, ctx.device, forward=lambda sb: loss_sum(pm.module, _copy(sb), sb.negatives)
    )
    try:
        bad.progress(step_batches(ctx, 0, 2))
    except RuntimeError as exc:
        assert "did not call sharded module" in str(exc), exc
    else:
        raise AssertionError("a forward that ignored the prefetched KJT was accepted")
    bad.reset()
    pipeline.reset()
    return {"losses": piped, "moved": float((want["rows"] - item_rows(make_model(item_table))).abs().max())}


@dataclass
class FeaturesBatch:
    features: KeyedJaggedTensor

    def to(self, device: torch.device, non_blocking: bool = False) -> FeaturesBatch:
        return FeaturesBatch(self.features.to(device, non_blocking=non_blocking))


def pipeline_mixed_collection(ctx, steps: int) -> list[float]:
    """gr-dynemb's toy collection mixing a static and a dynamic table in one EmbeddingCollection (its sharded form
    nests TorchRec's sharded collection of the static table): pipelined == plain loop, every lookup exactly."""
    from gr_parallel.pipeline import TrainPipeline
    from tests.gr_dynemb.test_sharding_workers import GLOBAL_BATCH, batch, build_sharded, loss_of, probe

    per_rank = GLOBAL_BATCH // ctx.world_size
    data = [FeaturesBatch(batch(s, ctx.rank * per_rank, (ctx.rank + 1) * per_rank)) for s in range(steps)]
    device = ctx.device.type
    plain_dmp, _, plan = build_sharded(ctx.world_size, "sgd", device=device)
    plain = []
    for b in data:
        loss = loss_of(plain_dmp(b.to(ctx.device).features))
        loss.backward()
        plain.append(global_loss(loss, ctx))
    dmp, _, _ = build_sharded(ctx.world_size, "sgd", plan=plan, device=device)
    pipeline = TrainPipeline(dmp, [], ctx.device, forward=lambda b: loss_of(dmp(b.features)))
    assert len(pipeline._sharded) == 1, sorted(pipeline._sharded)  # the outer collection only
    it = iter(data)
    piped = [global_loss(pipeline.progress(it), ctx) for _ in range(steps)]
    assert_losses(piped, plain, ctx, "mixed collection, pipeline vs plain loop")
    assert_equal(probe(dmp, device), probe(plain_dmp, device), "mixed collection lookups", atol=tolerance(ctx))
    pipeline.reset()
    return piped


def worker_pipelines(ctx, item_tables: list[str], steps: int, mixed: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {t: worker_pipeline(ctx, t, steps) for t in item_tables}
    if mixed:
        out["mixed"] = pipeline_mixed_collection(ctx, steps)
    return out


def _copy(sb: StepBatch) -> SequenceBatch:
    """The batch with a copied (equal but not identical) KJT: the prefetch cannot be matched to it."""
    from dataclasses import replace

    from torchrec import KeyedJaggedTensor

    f = sb.batch.features
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=f.keys(), values=f.values().clone(), lengths=f.lengths().clone())
    return replace(sb.batch, features=kjt)


# ------------------------------------------------------------------------------------------ checkpoints
def worker_resume(ctx, tmp: Path, item_table: str, k: int) -> dict[str, Any]:
    """Train 2k steps straight; train k, save, load into a differently initialised model, train k more: the same
    losses and the same final state, exactly (RNG included: the loss draws a jitter from the global RNG)."""
    from gr_parallel.checkpoint import load_distributed, save_distributed

    straight_pm = build(ctx, item_table)
    straight = train_plain(straight_pm, ctx, step_batches(ctx, 0, 2 * k), jitter=True)
    want = snapshot(straight_pm, ctx)

    torch.manual_seed(123)  # the RNG at the save is not the one at the straight run's start ...
    first = build(ctx, item_table)  # ... until build() re-seeds: both runs see the same draws up to step k
    before = train_plain(first, ctx, step_batches(ctx, 0, k), jitter=True)
    path = tmp / f"resume-{item_table}"
    save_distributed(path, first, {"dense": first.optimizer}, {"step": k, "losses": before}, ctx)
    assert not list(tmp.glob("*.tmp-*")), "a temporary directory survived the save"
    save_distributed(path, first, {"dense": first.optimizer}, {"step": k, "losses": before}, ctx)  # replaces it
    torch.rand(5)  # disturb the RNG: the load must restore it

    second = build(ctx, item_table, seed=1)
    loaded = load_distributed(path, second, {"dense": second.optimizer}, ctx)
    assert loaded.rng_restored and loaded.saved_world_size == ctx.world_size
    assert loaded.trainer_state == {"step": k, "losses": before}
    after = train_plain(second, ctx, step_batches(ctx, k, 2 * k), jitter=True)
    assert_losses(before + after, straight, ctx, "resumed vs straight")
    assert_equal(snapshot(second, ctx), want, "resumed vs straight", atol=tolerance(ctx))
    return {"losses": straight}


def worker_save_for_reshard(ctx, tmp: Path, item_table: str, k: int, tag: str = "") -> None:
    """Trains k steps and saves to ``reshard-<tag or item_table>``; records (rank 0) the rows and dense state at the
    save and after one more step."""
    from gr_parallel.checkpoint import save_distributed

    tag = tag or item_table
    pm = build(ctx, item_table)
    train_plain(pm, ctx, step_batches(ctx, 0, k))
    save_distributed(tmp / f"reshard-{tag}", pm, {"dense": pm.optimizer}, {"step": k}, ctx)
    at_save = snapshot(pm, ctx)
    loss = train_plain(pm, ctx, step_batches(ctx, k, k + 1))
    after = snapshot(pm, ctx)
    if ctx.rank == 0:
        torch.save({"at_save": at_save, "loss": loss, "after": after}, tmp / f"expected-{tag}.pt")


def worker_load_reshard(ctx, tmp: Path, item_table: str, k: int, tag: str = "") -> float:
    """Loads the 2-rank checkpoint ``reshard-<tag or item_table>`` on this layout: the same rows and dense state; the
    next step gives the loss and state the 2-rank run got (up to summation order). Returns the largest difference
    after the step."""
    from gr_parallel.checkpoint import load_distributed

    tag = tag or item_table
    expected = torch.load(tmp / f"expected-{tag}.pt")
    pm = build(ctx, item_table, seed=1)
    loaded = load_distributed(tmp / f"reshard-{tag}", pm, {"dense": pm.optimizer}, ctx)
    assert loaded.trainer_state == {"step": k} and loaded.saved_world_size == 2
    assert loaded.rng_restored == (ctx.world_size == 2)
    where = f"{tag} loaded on {ctx.world_size} ranks, tp={ctx.tp_size}"
    assert_equal(snapshot(pm, ctx), expected["at_save"], where)
    loss = train_plain(pm, ctx, step_batches(ctx, k, k + 1))
    torch.testing.assert_close(loss, expected["loss"], rtol=1e-5, atol=1e-6)
    got = snapshot(pm, ctx)
    assert_equal(got, expected["after"], f"next step, {where}", atol=1e-5)
    return max(float((got[n] - expected["after"][n]).abs().max()) for n in got)


def failed_save_keeps_the_old_checkpoint(ctx, path: Path) -> None:
    """A save that fails on one rank (rank 0 cannot pickle the trainer state) fails on every rank and publishes
    nothing: the checkpoint already at ``path`` stays as it was, no temporary directory is left."""
    from gr_parallel.checkpoint import save_distributed

    meta = (path / "meta.json").read_text()
    dense = (path / "dense.pt").read_bytes()
    pm = build(ctx, "static", seed=2)
    try:
        save_distributed(path, pm, {"dense": pm.optimizer}, {"unpicklable": lambda: None}, ctx)
    except Exception as exc:
        expected = "another rank failed" if ctx.rank else "lambda"
        assert expected in str(exc), f"rank {ctx.rank}: {exc!r}"
    else:
        raise AssertionError("a save that could not write the trainer state succeeded")
    dist.barrier()
    assert (path / "meta.json").read_text() == meta and (path / "dense.pt").read_bytes() == dense
    assert not list(path.parent.glob(f"{path.name}.tmp-*")), "the failed save left its temporary directory"


def _relayout(ctx, tp: int):
    """Re-initialises gr_parallel on the same process group with another TP size."""
    import gr_parallel

    gr_parallel.destroy()
    return gr_parallel.initialize(tp=tp, backend=ctx.backend)


def worker_save_on_two_ranks(ctx, tmp: Path, tables: list[str], k: int) -> dict[str, Any]:
    """Exact resume for each item table kind, then the checkpoints the re-shard loads read: one per table at
    (tp=1, dp=2), and a static-table one at (tp=2, dp=1)."""
    resumed = {t: worker_resume(ctx, tmp, t, k) for t in tables}
    for t in tables:
        worker_save_for_reshard(ctx, tmp, t, k)
    failed_save_keeps_the_old_checkpoint(ctx, tmp / "reshard-static")
    tp2 = _relayout(ctx, 2)
    worker_save_for_reshard(tp2, tmp, "static", k, tag="tp2")
    _relayout(tp2, 1)
    return resumed


def worker_load_on_other_world(ctx, tmp: Path, tables: list[str], k: int) -> dict[str, float]:
    """1 rank: every checkpoint at tp=1 (the tp=2 one is gathered), plus the mismatch errors. 4 ranks: the tp=1
    checkpoints at (tp=1, dp=4), then the static ones at (tp=2, dp=2): tp=1 -> 2 and dp=1 -> 2."""
    diffs = {t: worker_load_reshard(ctx, tmp, t, k) for t in tables}
    if ctx.world_size == 1:
        diffs["tp2"] = worker_load_reshard(ctx, tmp, "static", k, tag="tp2")
        worker_mismatch(ctx, tmp)
    else:
        tp2 = _relayout(ctx, 2)
        diffs["tp1->tp2"] = worker_load_reshard(tp2, tmp, "static", k)
        diffs["tp2"] = worker_load_reshard(tp2, tmp, "static", k, tag="tp2")
        _relayout(tp2, 1)
    return diffs


def worker_mismatch(ctx, tmp: Path) -> None:
    """Loading into a model the checkpoint does not fit fails with the reason; nothing half-written loads."""
    import dataclasses

    from gr_models.retrieval.model import RetrievalModel
    from gr_parallel.checkpoint import CheckpointMismatchError, load_distributed
    from gr_parallel.parallelize import parallelize
    from tests.gr_parallel.parity_workers import NUM_ITEMS, model_config

    path = tmp / "reshard-static"

    def expect(exc_type: type, pattern: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except exc_type as exc:
            assert pattern in str(exc), f"{pattern!r} not in {exc}"
        else:
            raise AssertionError(f"no {exc_type.__name__} ({pattern})")

    bigger = RetrievalModel(dataclasses.replace(model_config("static"), num_items=NUM_ITEMS + 8))
    pm = parallelize(bigger, ctx, build(ctx, "static").config)
    expect(
        CheckpointMismatchError,
        f"checkpoint shape [{NUM_ITEMS}, 16], model shape [{NUM_ITEMS + 8}, 16]",
        lambda: load_distributed(path, pm, ctx=ctx),
    )
    dynamic = build(ctx, "dynamic")
    expect(
        CheckpointMismatchError,
        "['dynamic:item_table'] are not in the checkpoint",
        lambda: load_distributed(path, dynamic, ctx=ctx),
    )
    static = build(ctx, "static")
    expect(
        CheckpointMismatchError,
        "holds dense optimizer(s) ['dense']",
        lambda: load_distributed(path, static, {"other": static.optimizer}, ctx),
    )
    unfinished = tmp / "unfinished"
    unfinished.mkdir(exist_ok=True)
    expect(FileNotFoundError, "has no meta.json", lambda: load_distributed(unfinished, static, ctx=ctx))


# ------------------------------------------------------------------------------------------ failing job
def crash_main(fail_rank: int, fail_step: int) -> None:
    """A torchrun job: every rank trains; ``fail_rank`` raises at ``fail_step`` while the others block in the next
    all-reduce."""
    import gr_parallel

    ctx = gr_parallel.initialize(backend="gloo", timeout_s=30.0)
    pm = build(ctx, "static")
    for sb in step_batches(ctx, 0, 100):
        if ctx.rank == fail_rank and sb.step == fail_step:
            print(f"rank {ctx.rank} raises at {time.time():.3f};", flush=True)  # one write: lines interleave
            raise ValueError(f"rank {ctx.rank} fails on purpose at step {sb.step}")
        train_plain(pm, ctx, iter([sb]))
        print(f"rank {ctx.rank} finished step {sb.step}", flush=True)
    time.sleep(60)  # never reached in the test: the job must die first
    gr_parallel.destroy()


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "crash":
        raise SystemExit("usage: python -m tests.gr_parallel.ckpt_workers crash FAIL_RANK FAIL_STEP")
    from torch.distributed.elastic.multiprocessing.errors import record

    record(crash_main)(int(sys.argv[2]), int(sys.argv[3]))
