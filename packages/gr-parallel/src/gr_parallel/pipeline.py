"""A sparse-dist train pipeline: batch i+1's host-to-device copy and sparse input all-to-all overlap batch i.

Per ``progress`` call (step i):

1. wait until batch i is on the device and its input dist is done (on CUDA: the side streams);
2. fetch batch i+1, copy it to the device (CUDA: on a copy stream) and start the input dist of its sparse features
   (every sharded module's ``input_dist``: the splits all-to-all; CUDA: on a dist stream);
3. forward of batch i: a sharded module called with the very KeyedJaggedTensor that was prefetched for it skips its
   own input dist and uses the prefetched one (``compute_and_output_dist``); any other call (e.g. looking up target
   or negative ids through the same table) runs the module's normal forward;
4. finish the input dist of batch i+1 (the value all-to-all), then backward of batch i, the ``before_step`` hook
   (dense gradient sync, clipping), the optimizer steps.

Why not TorchRec's ``TrainPipelineSparseDist``: it finds the sharded modules' inputs by fx-tracing the whole model
and allows each sharded module only one call per forward; a model may look a table up more than once per step (the
retrieval model's plain forward and loss do; its ``training_forward`` looks it up once) and the jagged HSTU forward
does not fx-trace. Matching the prefetched KJT by identity needs neither, and a forward that does not consume what
was prefetched is an error, never a silent miss.

Stream order on CUDA: the copy of batch i+1 runs on a copy stream without waiting for the compute stream, and the
dist stream (high priority) waits for the copy only. Memory is kept safe the allocator's way instead: when batch i
is handed to the compute stream, every CUDA tensor in it is recorded on that stream (``record_stream``), so its
memory is not given to a later copy until the compute stream's work queued before the batch was freed has run. An
earlier form made the copy wait for everything the compute stream had queued (the previous step's backward): the
input dist's host-side split sizes (a device-to-host read on the dist stream) then blocked the host until the
previous step had finished on the GPU, and the GPU idled while the host issued the next forward (in profiled DP=2
steps on 2 x H200: 10.5 ms of host time a step in the split read; DP=2 went from 53.2 to 44.4 ms a step without the
wait; gr-parallel README).
(Waiting on the current stream inside ``torch.cuda.stream(copy)`` is a no-op: the cause of the illegal memory
accesses this pipeline once had on 2 x H200.)

Results equal the plain loop's exactly: only the time the collectives are issued moves. One caveat: batch i+1 is
fetched from the iterator before batch i's forward, so a data pipeline that draws from the global torch RNG in the
main process (the step's negatives draw from it too) would interleave differently than in the plain loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchrec.distributed.types import ShardedModule
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

SparseFeatures = Callable[[Any], Mapping[str, KeyedJaggedTensor]]


@dataclass
class _Prefetch:
    """One sharded module's input dist of one batch, in flight."""

    features: KeyedJaggedTensor  # the object the model must pass to the module to consume this prefetch
    context: Any  # the module's sharding context, filled by input_dist and read by compute_and_output_dist
    request: Any  # Awaitable: first the splits (-> Awaitable of the data), then the data
    split: bool = False  # whether the splits arrived (request is now the data's Awaitable): wait on each stage once


class _PrefetchedForward:
    """Replaces a sharded module's ``forward``: serves the prefetched input dist to the call that passes the prefetched
    KJT, runs the original forward for every other call."""

    def __init__(self, name: str, module: ShardedModule, pipeline: TrainPipeline) -> None:
        self.name, self.module, self.pipeline = name, module, pipeline
        self.original = module.forward
        self.pending: _Prefetch | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        pending = self.pending
        if pending is None or kwargs or len(args) != 1 or args[0] is not pending.features:
            return self.original(*args, **kwargs)
        self.pending = None
        return self.module.compute_and_output_dist(pending.context, self.pipeline._finish_dist(pending))


def _copy_to_device(batch: Any, device: torch.device, copy_stream: torch.cuda.Stream | None) -> Any:
    """``batch.to(device, non_blocking=True)``; on CUDA issued on ``copy_stream`` (the copy's memory is allocated
    there), not ordered after the compute stream: the batch it may reuse memory from was recorded on the compute
    stream when handed over (``_record_stream``)."""
    if copy_stream is None:
        return batch.to(device, non_blocking=True)
    with torch.cuda.stream(copy_stream):
        return batch.to(device, non_blocking=True)


def _record_stream(obj: Any, stream: torch.cuda.Stream, seen: set[int] | None = None) -> None:
    """``record_stream(stream)`` on every CUDA tensor reachable from ``obj`` (tensors, KeyedJaggedTensors and other
    objects with ``record_stream``, lists, tuples, dicts, dataclasses and plain objects' attributes, ``__slots__``
    included): their memory is
    not reused until ``stream``'s work queued before they are freed has run."""
    seen = set() if seen is None else seen
    if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.is_cuda:
            obj.record_stream(stream)
    elif callable(getattr(obj, "record_stream", None)) and not isinstance(obj, type):
        obj.record_stream(stream)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _record_stream(v, stream, seen)
    elif isinstance(obj, dict):
        for v in obj.values():
            _record_stream(v, stream, seen)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _record_stream(getattr(obj, f.name), stream, seen)
    else:
        for v in getattr(obj, "__dict__", {}).values():
            _record_stream(v, stream, seen)
        for cls in type(obj).__mro__:  # attributes in __slots__ have no __dict__ entry
            for name in getattr(cls, "__slots__", ()):
                if name not in ("__dict__", "__weakref__") and hasattr(obj, name):
                    _record_stream(getattr(obj, name), stream, seen)


def _outermost_sharded(model: nn.Module) -> dict[str, ShardedModule]:
    """The model's sharded modules by name, leaving out those inside another (gr-dynemb's sharded collection holds
    TorchRec's sharded collection of its static tables: the outer one is what the model calls)."""
    found = {name: m for name, m in model.named_modules() if isinstance(m, ShardedModule)}

    def inside(name: str, other: str) -> bool:
        return name != other and (other == "" or name.startswith(other + "."))

    return {n: m for n, m in found.items() if not any(inside(n, other) for other in found)}


class TrainPipeline:
    """Runs training steps with the next batch's copy and sparse input dist in flight.

    ``model``: the sharded model (DMP, or any module holding TorchRec ``ShardedModule``s). ``optimizers``: the dense
    optimizer(s) (fused embedding optimizers step inside backward). ``device``: where batches go (``batch.to(device,
    non_blocking=True)``). ``forward(batch)``: the training step's forward, returning the loss or a tuple whose first
    element is the loss (default: ``model(batch)``); ``progress`` returns it. ``sparse_features(batch)``: the KJT each
    sharded module is called with, by module name (its fqn in ``model``, or any dotted suffix of it); the default gives
    ``batch.features`` to the model's only sharded module. ``before_step()``: runs after backward and before the
    optimizer steps (dense gradient all-reduce, clipping: ``ParallelModel.sync_grads``). ``zero_grad()``: clears the
    dense gradients before each training forward (default: every optimizer's ``zero_grad(set_to_none=True)``); with a
    ``ParallelModel`` pass ``pm.zero_grad``, which also clears the gradient buffers Megatron-Core's DDP accumulates
    into (``ParallelizeConfig.megatron_ddp``; the optimizers' zero_grad does not reach those, and a model whose
    parameters carry Megatron's ``main_grad`` without ``zero_grad`` given is refused). Used in eval mode
    (``model.eval()``) it runs forward only.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        device: torch.device | str,
        *,
        forward: Callable[[Any], Any] | None = None,
        sparse_features: SparseFeatures | None = None,
        before_step: Callable[[], None] | None = None,
        zero_grad: Callable[[], None] | None = None,
    ) -> None:
        self.model = model
        self.optimizers = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        self.device = torch.device(device)
        self._forward = forward if forward is not None else model
        self._before_step = before_step
        if zero_grad is None and any(hasattr(p, "main_grad") for p in model.parameters()):
            # Megatron-Core DDP (ParallelizeConfig.megatron_ddp) marks its parameters with main_grad: the default would
            # sum every step's gradients into those buffers.
            raise ValueError(
                "the model's dense gradients accumulate in Megatron-Core DDP's main_grad buffers, which the "
                "optimizers' zero_grad does not clear: pass zero_grad=pm.zero_grad (gr_parallel.ParallelModel)"
            )
        self._zero_grad = zero_grad if zero_grad is not None else self._zero_optimizer_grads
        self._sharded = _outermost_sharded(model)
        if not self._sharded:
            raise ValueError(f"{type(model).__name__} holds no TorchRec sharded module: shard it (DMP) first")
        self._sparse_features = sparse_features if sparse_features is not None else self._default_sparse_features
        self._forwards: dict[str, _PrefetchedForward] = {}
        cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        # High priority: the input dist's small kernels (bucketize, permutes) run between the compute stream's large
        # ones, so the host's read of the split sizes returns soon.
        self._dist_stream = torch.cuda.Stream(self.device, priority=-1) if cuda else None
        self._next: tuple[Any, dict[str, _Prefetch]] | None = None  # batch i+1 on the device, its dists in flight

    # ------------------------------------------------------------------ public
    def progress(self, iterator: Iterator[Any]) -> Any:
        """Trains on the next batch of ``iterator`` (prefetching the one after); returns ``forward(batch)``. Raises
        StopIteration when the iterator is exhausted and every fetched batch has been trained on. When ``forward``
        raises, the batch is not trained on and the next call goes on with the batch prefetched during it."""
        self._attach()
        if self._next is None:  # the first step, or a fresh iterator after an exhausted one
            self._next = self._fetch(iterator)
            if self._next is None:
                raise StopIteration
            self._finish_splits(self._next[1])
        batch, prefetched = self._next
        self._next = None
        if self._copy_stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._copy_stream)
            _record_stream(batch, current)  # the compute stream uses it from here on
        for name, pending in prefetched.items():
            self._forwards[name].pending = pending
        self._next = self._fetch(iterator)  # batch i+1: copy + splits all-to-all, in flight during forward i
        if self.model.training:
            self._zero_grad()
        try:
            output = self._forward(batch)
        finally:
            unused = [name for name, fwd in self._forwards.items() if fwd.pending is not None]
            for name in unused:  # complete their all-to-alls: every rank issued them
                pending, self._forwards[name].pending = self._forwards[name].pending, None
                self._finish_dist(pending)  # type: ignore[arg-type]
        if unused:
            raise RuntimeError(
                f"the forward did not call sharded module(s) {unused} with the KeyedJaggedTensor that "
                "sparse_features(batch) gave for them: pass that object itself (not a copy or a "
                "permutation), or fix sparse_features"
            )
        if self._next is not None:
            self._finish_splits(self._next[1])  # the value all-to-all of batch i+1 runs during backward i
        if self.model.training:
            loss = output if isinstance(output, torch.Tensor) else output[0]
            loss.backward()
            if self._before_step is not None:
                self._before_step()
            for opt in self.optimizers:
                opt.step()
        return output

    def reset(self) -> None:
        """Drops the prefetched batch (its input dist is completed first, so every rank's collectives stay matched)
        and gives the sharded modules their own forwards back, e.g. before evaluation or at the end of an epoch
        stopped early (a run stopped on max_steps leaves the batch after its last one prefetched, its splits already
        in). The next ``progress`` starts afresh on whatever iterator it is given; the dropped batch is not trained.
        """
        prefetched = self._next[1] if self._next is not None else {}
        self._next = None  # released even if a collective below fails
        try:
            for pending in prefetched.values():
                self._finish_dist(pending)
        finally:
            for name, fwd in self._forwards.items():
                fwd.pending = None
                if self._sharded[name].forward is fwd:
                    del self._sharded[name].forward  # the instance attribute: the class's forward shows again
            self._forwards.clear()

    # ------------------------------------------------------------------ steps
    def _attach(self) -> None:
        if not self._forwards:
            for name, module in self._sharded.items():
                fwd = _PrefetchedForward(name, module, self)
                module.forward = fwd  # type: ignore[method-assign]
                self._forwards[name] = fwd

    def _fetch(self, iterator: Iterator[Any]) -> tuple[Any, dict[str, _Prefetch]] | None:
        """The next batch copied to the device with its sparse input dists started; None when exhausted."""
        try:
            host_batch = next(iterator)
        except StopIteration:
            return None
        if not hasattr(host_batch, "to"):
            raise TypeError(f"a pipelined batch needs .to(device, non_blocking=...), got {type(host_batch).__name__}")
        batch = _copy_to_device(host_batch, self.device, self._copy_stream)
        features = dict(self._sparse_features(batch))
        prefetched: dict[str, _Prefetch] = {}
        with self._on(self._dist_stream):
            if self._dist_stream is not None:
                self._dist_stream.wait_stream(self._copy_stream)  # type: ignore[arg-type]
            for key, kjt in features.items():
                name = self._resolve(key)
                if name in prefetched:
                    raise ValueError(f"sparse_features gave two inputs for sharded module {name!r}")
                if not isinstance(kjt, KeyedJaggedTensor):
                    raise TypeError(f"sparse_features[{key!r}] must be a KeyedJaggedTensor, got {type(kjt).__name__}")
                module = self._sharded[name]
                context = module.create_context()
                prefetched[name] = _Prefetch(kjt, context, module.input_dist(context, kjt))
        return batch, prefetched

    def _finish_splits(self, prefetched: dict[str, _Prefetch]) -> None:
        """First stage of the input dists: the splits arrive and the value all-to-alls start (once per prefetch)."""
        due = [pending for pending in prefetched.values() if not pending.split]
        if not due:
            return
        with self._on(self._dist_stream):
            for pending in due:
                pending.request = pending.request.wait()
                pending.split = True

    def _finish_dist(self, pending: _Prefetch) -> Any:
        """Second stage: the module's input arrives; on CUDA handed over to the compute stream. Finishes the first
        stage too where it is still due (a forward that raised left batch i+1's splits in flight)."""
        self._finish_splits({"": pending})
        with self._on(self._dist_stream):
            data = pending.request.wait()
        if self._dist_stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._dist_stream)
            data.record_stream(current)
            pending.context.record_stream(current)
        return data

    # ------------------------------------------------------------------ helpers
    def _zero_optimizer_grads(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def _on(self, stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _resolve(self, key: str) -> str:
        if key in self._sharded:
            return key
        found = [name for name in self._sharded if name.endswith("." + key)]
        if len(found) != 1:
            problem = "no" if not found else f"{len(found)} ({found})"
            raise KeyError(
                f"sparse_features key {key!r} names {problem} sharded module(s); "
                f"the model's are {sorted(self._sharded)}"
            )
        return found[0]

    def _default_sparse_features(self, batch: Any) -> dict[str, KeyedJaggedTensor]:
        features = getattr(batch, "features", None)
        if len(self._sharded) != 1 or not isinstance(features, KeyedJaggedTensor):
            raise ValueError(
                "the default sparse_features gives batch.features to the model's only sharded module; this model has "
                f"{sorted(self._sharded)} and the batch {'a' if isinstance(features, KeyedJaggedTensor) else 'no'} "
                "KeyedJaggedTensor .features: pass sparse_features=lambda batch: {module_name: kjt, ...}"
            )
        return {next(iter(self._sharded)): features}
