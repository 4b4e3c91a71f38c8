"""gr_parallel.TrainPipeline (CPU, gloo, 2 ranks): batch i+1's copy and sparse input all-to-all are issued before
batch i's forward, and training through the pipeline equals the plain loop exactly (every loss, every item row and
dense parameter), with a static (fused Adagrad) or a dynamic (gr-dynemb, Adam) item table looked up three times a
step (inputs through the prefetched dist, targets and negatives through the module's own forward); and a collection
mixing a static and a dynamic table (gr-dynemb's sharded collection nesting TorchRec's) pipelines as one module."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from gr_parallel.pipeline import TrainPipeline, _copy_to_device, _record_stream
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


one_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@one_gpu
def test_the_next_batch_copy_does_not_wait_for_the_compute_stream() -> None:
    """Batch i+1's copy must not queue behind the compute stream's work (the previous step's backward): the input
    dist's host-side read of the split sizes would then block the host until the GPU is idle. The compute stream spins
    ~0.5 s; the copy stream finishes first."""
    device = torch.device("cuda")
    copy_stream = torch.cuda.Stream(device)
    host = torch.arange(1 << 20).pin_memory()
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # cycles, on the current (compute) stream
    spun = torch.cuda.Event()
    spun.record()
    out = _copy_to_device(host, device, copy_stream)
    copy_stream.synchronize()
    assert not spun.query(), "the copy waited for the compute stream's earlier work"
    torch.cuda.current_stream().wait_stream(copy_stream)
    assert torch.equal(out.cpu(), host)


@pytest.mark.gpu
@one_gpu
def test_a_handed_over_batch_is_not_reused_while_the_compute_stream_still_reads_it() -> None:
    """What makes the copy above safe: a batch recorded on the compute stream keeps its memory from the next copy
    until the compute stream's work queued before its release has run (without the record, the copy stream's
    allocator hands the same block straight back: the control)."""
    device = torch.device("cuda")
    copy_stream = torch.cuda.Stream(device)
    current = torch.cuda.current_stream()
    host = torch.arange(1 << 20).pin_memory()
    torch.cuda.synchronize()

    control = _copy_to_device(host, device, copy_stream)
    ptr = control.data_ptr()
    del control
    assert _copy_to_device(host, device, copy_stream).data_ptr() == ptr  # the allocator reuses a freed block

    batch = {"ids": [_copy_to_device(host, device, copy_stream)]}
    current.wait_stream(copy_stream)
    _record_stream(batch, current)
    ptr = batch["ids"][0].data_ptr()
    batch["ids"][0].sum()  # the reduction's first launch loads its module, which (lazy loading) syncs the device
    torch.cuda._sleep(1_000_000_000)
    total = batch["ids"][0].sum()  # queued behind the spin
    del batch
    nxt = _copy_to_device(host * 2, device, copy_stream)
    assert nxt.data_ptr() != ptr, "the next copy took memory the compute stream has yet to read"
    torch.cuda.synchronize()
    assert int(total) == int(host.sum()) and torch.equal(nxt.cpu(), host * 2)


def test_record_stream_reaches_every_tensor_holder_once() -> None:
    """The walk behind the hand-over: containers, dataclasses, plain objects and anything with ``record_stream``
    (KeyedJaggedTensor), each once, cycles included; CPU tensors are left alone."""
    calls: list[str] = []

    class Holder:
        def __init__(self, name: str) -> None:
            self.name = name

        def record_stream(self, stream: object) -> None:
            calls.append(self.name)

    @dataclasses.dataclass
    class Batch:
        a: Holder
        rest: list

    class Plain:
        def __init__(self) -> None:
            self.inner = {"b": Holder("b"), "cpu": torch.zeros(2), "n": 3}
            self.me = self

    class Slotted:
        __slots__ = ("c", "unset")

        def __init__(self) -> None:
            self.c = Holder("c")

    shared = Holder("shared")
    batch = Batch(Holder("a"), [shared, (shared, Plain()), None, "text", Slotted()])
    _record_stream(batch, object())
    assert sorted(calls) == ["a", "b", "c", "shared"]


def test_pipeline_needs_a_sharded_model() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="holds no TorchRec sharded module"):
        TrainPipeline(model, torch.optim.SGD(model.parameters(), lr=0.1), "cpu")
