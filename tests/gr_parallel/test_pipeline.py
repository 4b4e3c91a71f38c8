"""gr_parallel.TrainPipeline (CPU, gloo, 2 ranks): batch i+1's copy and sparse input all-to-all are issued before
batch i's forward, and training through the pipeline equals the plain loop exactly (every loss, every item row and
dense parameter), with a static (fused Adagrad) or a dynamic (gr-dynemb, Adam) item table looked up three times a
step (inputs through the prefetched dist, targets and negatives through the module's own forward); and a collection
mixing a static and a dynamic table (gr-dynemb's sharded collection nesting TorchRec's) pipelines as one module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gr_parallel.pipeline import TrainPipeline, _copy_to_device
from tests.gr_parallel.ckpt_workers import run, worker_pipelines

STEPS = 6


def test_pipeline_equals_plain_loop_on_two_ranks() -> None:
    results = run(2, worker_pipelines, ["static", "dynamic"], STEPS)
    for table in ("static", "dynamic"):
        losses = [r[table]["losses"] for r in results]
        assert losses[0] == losses[1] and len(losses[0]) == STEPS  # every rank saw the same global losses
        assert results[0][table]["moved"] > 1e-3, "the item rows barely trained: the comparison would be vacuous"
    assert results[0]["mixed"] == results[1]["mixed"] and len(results[0]["mixed"]) == STEPS


two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"
)


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("table", ["static", "dynamic"])
def test_pipeline_equals_plain_loop_on_two_gpus(table: str) -> None:
    """Over NCCL, with the copy and input dist on their own CUDA streams (within 1e-5: embedding backward kernels
    accumulate with atomics)."""
    results = run(2, worker_pipelines, [table], STEPS, table == "dynamic", backend="nccl")  # mixed: a CUDA table
    assert results[0][table]["losses"] == results[1][table]["losses"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_next_batch_copy_waits_for_the_compute_streams_queued_work() -> None:
    """The copy of batch i+1 may reuse memory of a batch whose backward is still queued on the compute stream, so it
    must start after that work. The compute stream spins ~0.5 s; when the copy stream is done, so must the spin be.
    (The pipeline once waited on the copy stream itself, a no-op: illegal memory accesses on 2 x H200.)"""
    device = torch.device("cuda")
    copy_stream = torch.cuda.Stream(device)
    host = torch.arange(1 << 20).pin_memory()
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # cycles, on the current (compute) stream
    spun = torch.cuda.Event()
    spun.record()
    out = _copy_to_device(host, device, copy_stream)
    copy_stream.synchronize()
    assert spun.query(), "the copy finished while the compute stream's earlier work was still running"
    torch.cuda.current_stream().wait_stream(copy_stream)
    assert torch.equal(out.cpu(), host)


def test_pipeline_needs_a_sharded_model() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="holds no TorchRec sharded module"):
        TrainPipeline(model, torch.optim.SGD(model.parameters(), lr=0.1), "cpu")
