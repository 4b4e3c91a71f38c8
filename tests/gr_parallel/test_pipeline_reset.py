"""gr_parallel.TrainPipeline stopped and restarted (CPU, gloo, 2 ranks): ``reset()`` after a run stopped mid-epoch
(what a max_steps stop does: the next batch is prefetched, its splits already in) completes that prefetch's input
dist, drops the batch and leaves the pipeline reusable; a forward that raises leaves the next batch's splits in
flight and the next ``progress`` trains that batch. Every loss, item row and dense parameter then equals the plain
loop's over the batches actually trained, exactly."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.gr_parallel.ckpt_workers import (
    assert_equal,
    assert_losses,
    build,
    global_loss,
    run,
    snapshot,
    step_batches,
    step_loss,
    tolerance,
    train_plain,
)

STEPS = 6
STOP_AFTER = 2  # the first run trains steps 0 and 1 and stops with step 2 prefetched
RAISES_AT = 3  # the second run's forward raises on step 3 (step 4 prefetched, its splits in flight)


class InjectedError(RuntimeError):
    pass


def worker_stop_and_restart(ctx) -> dict[str, Any]:
    """Run 1 trains steps 0-1 of an iterator over 0-5 and resets; run 2, on the same pipeline, trains 2, raises at
    3, trains 4 and 5. The plain loop over 0, 1, 2, 4, 5 is the reference."""
    from gr_parallel.pipeline import TrainPipeline

    trained = [s for s in range(STEPS) if s != RAISES_AT]
    plain_pm = build(ctx, "static")
    plain = train_plain(plain_pm, ctx, (sb for sb in step_batches(ctx, 0, STEPS) if sb.step in trained))
    want = snapshot(plain_pm, ctx)

    pm = build(ctx, "static")

    def forward(sb) -> tuple[torch.Tensor, int]:
        if sb.step == RAISES_AT:
            raise InjectedError(f"step {sb.step}")
        return step_loss(pm, ctx, sb, jitter=False), sb.step

    def before_step() -> None:
        pm.sync_grads()
        pm.clip_grad_norm_()

    # Parameters marked the way Megatron-Core DDP marks them: without zero_grad= the pipeline would never clear
    # their main_grad buffers (summed gradients), so it refuses.
    dense = next(p for p in pm.dmp.parameters() if p.requires_grad)
    dense.main_grad = torch.zeros_like(dense)
    with pytest.raises(ValueError, match=r"pass zero_grad=pm\.zero_grad"):
        TrainPipeline(pm.dmp, pm.optimizer, ctx.device, forward=forward)
    del dense.main_grad
    pipeline = TrainPipeline(
        pm.dmp, pm.optimizer, ctx.device, forward=forward, before_step=before_step, zero_grad=pm.zero_grad
    )
    (table,) = pipeline._sharded.values()
    piped, steps = [], []

    def train(it, n: int | None = None) -> None:
        while n is None or n > 0:
            try:
                loss, step = pipeline.progress(it)
            except StopIteration:
                return
            piped.append(global_loss(loss, ctx))
            steps.append(step)
            n = None if n is None else n - 1

    # Run 1: a max_steps-style stop in the middle of the iterator, then reset (twice: the second is a no-op).
    train(step_batches(ctx, 0, STEPS), STOP_AFTER)
    assert pipeline._next is not None, "nothing was prefetched at the stop: the reset below would test nothing"
    pipeline.reset()
    assert pipeline._next is None, "reset kept the prefetched batch"
    assert "forward" not in vars(table), "reset left the pipeline's forward on the sharded module"
    pipeline.reset()

    # Run 2: the same pipeline on a fresh iterator; a forward that raises, then training goes on.
    it = step_batches(ctx, STOP_AFTER, STEPS)
    train(it, RAISES_AT - STOP_AFTER)
    assert steps[-1] == RAISES_AT - 1, steps
    try:
        pipeline.progress(it)
    except InjectedError:
        pass
    else:
        raise AssertionError(f"step {RAISES_AT}: the forward's error did not come through")
    train(it)
    pipeline.reset()
    assert "forward" not in vars(table)

    assert steps == trained, f"trained steps {steps}, expected {trained}"
    assert_losses(piped, plain, ctx, "stopped and restarted pipeline vs plain loop")
    assert_equal(snapshot(pm, ctx), want, "stopped and restarted pipeline vs plain loop", atol=tolerance(ctx))
    return {"losses": piped}


def test_pipeline_reset_after_a_stop_mid_iterator_and_reuse() -> None:
    results = run(2, worker_stop_and_restart)
    assert results[0]["losses"] == results[1]["losses"]
    assert len(results[0]["losses"]) == STEPS - 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_pipeline_reset_and_reuse_on_two_gpus() -> None:
    """Over NCCL, with the copy and input dist on the pipeline's CUDA streams (within 1e-5 of the plain loop)."""
    results = run(2, worker_stop_and_restart, backend="nccl")
    assert results[0]["losses"] == results[1]["losses"]
