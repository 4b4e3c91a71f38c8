"""The process layout of a hybrid-parallel job: torch.distributed, the TP/DP groups and Megatron-Core's state.

``world = tp * dp`` in Megatron's rank order: a tensor-parallel group is ``tp`` consecutive ranks (``rank // tp``
names it), a data-parallel group is the ranks with equal ``rank % tp``. All ranks of one TP group read the same
local batch; DP ranks read different slices of the global batch.

The groups are Megatron-Core's own (``parallel_state.initialize_model_parallel``, which works on gloo/CPU as well as
NCCL), so Megatron code that reads ``parallel_state`` and our code that passes ``ctx.tp_group`` explicitly talk over
the same communicators. One context per process: ``initialize`` is idempotent for the same config and refuses a
different one until ``destroy``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

_BACKENDS = ("gloo", "nccl")


@dataclass
class ParallelConfig:
    """How to lay out the job. ``tp``: tensor-parallel size (divides the world size; the rest is data parallel).
    ``backend``: "gloo" or "nccl"; ``None`` picks nccl when CUDA is available, else gloo (or, when the caller already
    initialised torch.distributed, whatever it used). ``timeout_s``: collective timeout of the process groups, so a
    dead rank makes the others fail instead of hanging."""

    tp: int = 1
    backend: str | None = None
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if isinstance(self.tp, bool) or not isinstance(self.tp, int) or self.tp < 1:
            raise ValueError(f"ParallelConfig.tp must be a positive int, got {self.tp!r}")
        if self.backend is not None and self.backend not in _BACKENDS:
            raise ValueError(f"ParallelConfig.backend must be one of {_BACKENDS} or None, got {self.backend!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"ParallelConfig.timeout_s must be positive, got {self.timeout_s!r}")


@dataclass
class ParallelContext:
    """Where this process sits in the layout, and the groups it talks over."""

    rank: int
    world_size: int
    tp_size: int
    dp_size: int
    tp_rank: int
    dp_rank: int
    tp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    device: torch.device
    backend: str
    config: ParallelConfig = field(repr=False)
    # Global ranks of this process's TP and DP groups, in group-rank order.
    tp_ranks: list[int] = field(default_factory=list)
    dp_ranks: list[int] = field(default_factory=list)

    @property
    def is_first(self) -> bool:
        """Rank 0 of the world (the one that writes shared files)."""
        return self.rank == 0


@dataclass
class _State:
    ctx: ParallelContext
    owns_process_group: bool  # initialize() created the default group, so destroy() tears it down
    owns_megatron: bool  # initialize() initialised Megatron's parallel_state


_STATE: _State | None = None


def initialize(config: ParallelConfig | None = None, **overrides: object) -> ParallelContext:
    """Sets up (or returns the existing) parallel context.

    ``config`` fields may be overridden by keyword (``initialize(tp=2)``). torch.distributed is initialised from the
    torchrun environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) unless the caller already did;
    with no such environment a one-process group is made, so the same code runs without torchrun. On nccl each process
    uses GPU ``LOCAL_RANK``. Calling again with the same config returns the same context; a different config raises
    until ``destroy()``."""
    global _STATE
    config = dataclasses.replace(config or ParallelConfig(), **overrides)  # type: ignore[arg-type]
    if _STATE is not None:
        current = _STATE.ctx.config
        if (config.tp, config.timeout_s) != (current.tp, current.timeout_s) or config.backend not in (
            None,
            _STATE.ctx.backend,
        ):
            raise RuntimeError(
                f"gr_parallel is already initialised with {current} (backend {_STATE.ctx.backend!r}); "
                f"cannot re-initialise with {config}: call gr_parallel.destroy() first"
            )
        return _STATE.ctx

    owns_pg = not dist.is_initialized()
    backend = _resolve_backend(config.backend)
    world_size = dist.get_world_size() if not owns_pg else int(os.environ.get("WORLD_SIZE", "1"))
    if world_size % config.tp:
        raise ValueError(
            f"tensor-parallel size {config.tp} does not divide the world size {world_size}: "
            "world = tp * dp needs world % tp == 0"
        )
    device = _select_device(backend)
    if owns_pg:
        _init_process_group(backend, config.timeout_s, device)
    try:
        ctx, owns_megatron = _build_context(config, backend, device)
    except BaseException:
        if owns_pg:
            dist.destroy_process_group()
        raise
    _STATE = _State(ctx=ctx, owns_process_group=owns_pg, owns_megatron=owns_megatron)
    return ctx


def get_context() -> ParallelContext:
    """The context ``initialize`` built; an error when there is none."""
    if _STATE is None:
        raise RuntimeError("gr_parallel is not initialised: call gr_parallel.initialize(...) first")
    return _STATE.ctx


def is_initialized() -> bool:
    return _STATE is not None


def destroy() -> None:
    """Tears down what ``initialize`` set up: Megatron's parallel state and its groups, and the default process group
    if ``initialize`` created it (a group the caller created stays). A no-op when not initialised."""
    global _STATE
    if _STATE is None:
        return
    state, _STATE = _STATE, None
    if state.owns_megatron:
        from megatron.core import parallel_state

        groups = [g for g in (getattr(parallel_state, "_global_process_group_list", None) or []) if g is not None]
        parallel_state.destroy_model_parallel()
        if not state.owns_process_group:  # otherwise destroying the default group below destroys them all
            registered = dist.distributed_c10d._world.pg_map
            for group in groups:
                if group in registered:
                    dist.destroy_process_group(group)
    if state.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def _resolve_backend(requested: str | None) -> str:
    if dist.is_initialized():
        existing = str(dist.get_backend())
        names = {part.split(":")[-1] for part in existing.split(",")}  # "cpu:gloo,cuda:nccl" -> {gloo, nccl}
        if requested is None:
            return "nccl" if "nccl" in names and torch.cuda.is_available() else sorted(names)[0]
        if requested not in names:
            raise ValueError(f"torch.distributed is already initialised with {existing!r}; asked for {requested!r}")
        return requested
    if requested is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA, which is not available; use backend='gloo'")
    return requested


def _select_device(backend: str) -> torch.device:
    if backend != "nccl":
        return torch.device("cpu")
    local_rank = os.environ.get("LOCAL_RANK")
    index = int(local_rank) if local_rank is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {index} but only {torch.cuda.device_count()} CUDA devices are visible")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _init_process_group(backend: str, timeout_s: float, device: torch.device) -> None:
    timeout = timedelta(seconds=timeout_s)
    if "WORLD_SIZE" not in os.environ:
        # Not under torchrun: a group of one over an in-memory store, so single-process runs share the code path.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE is set but {missing} are not: launch with torchrun or set them")
    kwargs: dict = {}
    if device.type == "cuda":
        kwargs["device_id"] = device  # binds the NCCL communicator to this GPU eagerly
    dist.init_process_group(backend, init_method="env://", timeout=timeout, **kwargs)


def _build_context(config: ParallelConfig, backend: str, device: torch.device) -> tuple[ParallelContext, bool]:
    from megatron.core import parallel_state

    owns_megatron = not parallel_state.model_parallel_is_initialized()
    if owns_megatron:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=config.tp,
            # A float is fine: Megatron only builds timedelta(minutes=...) from it.
            distributed_timeout_minutes=config.timeout_s / 60.0,  # type: ignore[arg-type]
            # On gloo the main groups are gloo already; Megatron's extra gloo copies would only cost sockets.
            create_gloo_process_groups=backend != "gloo",
        )
    elif parallel_state.get_tensor_model_parallel_world_size() != config.tp:
        raise RuntimeError(
            f"Megatron parallel_state is already initialised with tensor-parallel size "
            f"{parallel_state.get_tensor_model_parallel_world_size()}, not {config.tp}"
        )
    try:
        return _context_from_megatron(config, backend, device), owns_megatron
    except BaseException:
        if owns_megatron:
            parallel_state.destroy_model_parallel()
        raise


def _context_from_megatron(config: ParallelConfig, backend: str, device: torch.device) -> ParallelContext:
    from megatron.core import parallel_state

    world_size, rank = dist.get_world_size(), dist.get_rank()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    dp_group = parallel_state.get_data_parallel_group()
    tp_ranks = dist.get_process_group_ranks(tp_group)
    dp_ranks = dist.get_process_group_ranks(dp_group)
    tp, dp = config.tp, world_size // config.tp
    # The layout every gr_parallel module assumes (Megatron's "tp-cp-ep-dp-pp" order without cp/ep/pp).
    expected_tp = list(range(rank // tp * tp, rank // tp * tp + tp))
    expected_dp = list(range(rank % tp, world_size, tp))
    if tp_ranks != expected_tp or dp_ranks != expected_dp:
        raise RuntimeError(
            f"Megatron built TP group {tp_ranks} and DP group {dp_ranks} for rank {rank}; expected {expected_tp} "
            f"and {expected_dp} (pipeline/context/expert parallelism are not supported)"
        )
    return ParallelContext(
        rank=rank,
        world_size=world_size,
        tp_size=tp,
        dp_size=dp,
        tp_rank=rank % tp,
        dp_rank=rank // tp,
        tp_group=tp_group,
        dp_group=dp_group,
        device=device,
        backend=backend,
        config=dataclasses.replace(config, backend=backend),
        tp_ranks=tp_ranks,
        dp_ranks=dp_ranks,
    )
