"""Run a function on N local ranks without torchrun, failing fast: the first rank that raises (or dies) takes the
whole job down with its error, instead of leaving the others blocked in a collective until a timeout.

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` processes, each with torch.distributed initialised over a
file store (no ports) and the torchrun environment variables set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), so code
that calls ``gr_parallel.initialize()`` runs unchanged. It returns every rank's return value; when a rank raises it
kills the survivors and raises ``RankFailedError`` naming the rank, its exception and traceback (a rank that died
without a word, killed or hard-exited, is named before the connection errors it caused in its peers); when the job
outlives ``timeout_s`` it kills every rank and raises ``TimeoutError``. Used by tests and small examples; real jobs
use ``torchrun`` (whose agent does the same with ``--max-restarts 0``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any


class RankFailedError(RuntimeError):
    """A rank of a ``run_ranks`` job raised or died; ``rank`` is the first one observed, ``remote_traceback`` its
    traceback (empty when the process died without raising, e.g. killed by a signal)."""

    def __init__(self, rank: int, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"rank {rank} failed: {message}" + (f"\n{remote_traceback}" if remote_traceback else ""))
        self.rank = rank
        self.remote_traceback = remote_traceback


def _rank_main(
    rank: int,
    world_size: int,
    store_path: str,
    backend: str,
    pg_timeout_s: float,
    fn: Callable[..., Any],
    args: tuple,
    results: mp.Queue,
) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size)
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            torch.cuda.set_device(rank)
            kwargs["device_id"] = torch.device("cuda", rank)
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout_s), **kwargs
        )
        value = fn(*args)
    except BaseException as exc:  # every failure must reach the parent, SystemExit included
        results.put(("error", rank, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        results.close()
        results.join_thread()  # the report must leave before the hard exit below
        os._exit(1)  # no teardown: peers may be blocked in a collective this rank will never join
    results.put(("ok", rank, value, ""))
    if dist.is_initialized():
        dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 600.0,
    pg_timeout_s: float | None = None,
    grace_s: float = 5.0,
) -> list[Any]:
    """Runs ``fn(*args)`` on ``world_size`` spawned ranks of ``backend`` (gloo, or nccl with rank r on GPU r); returns
    the ranks' return values in rank order (they must pickle; so must ``fn``, a module-level function, and ``args``).

    ``timeout_s``: the whole job's limit. ``pg_timeout_s``: the process groups' collective timeout (default
    ``timeout_s``). ``grace_s``: how long survivors get after SIGTERM before SIGKILL."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if timeout_s <= 0 or grace_s < 0:
        raise ValueError(f"need timeout_s > 0 and grace_s >= 0, got {timeout_s}, {grace_s}")
    spawn = mp.get_context("spawn")
    results: mp.Queue = spawn.Queue()
    with tempfile.TemporaryDirectory(prefix="gr_parallel_ranks_") as tmp:
        store = str(Path(tmp) / "store")
        procs = [
            spawn.Process(
                target=_rank_main,
                args=(r, world_size, store, backend, pg_timeout_s or timeout_s, fn, args, results),
                name=f"rank{r}",
                daemon=False,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        try:
            return _collect(procs, results, world_size, timeout_s)
        finally:
            _stop(procs, grace_s)


def _collect(procs: list, results: mp.Queue, world_size: int, timeout_s: float) -> list[Any]:
    values: dict[int, Any] = {}
    reported: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(values) < world_size:
        try:
            kind, rank, value, tb = results.get(timeout=0.1)
        except queue.Empty:
            ended = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode is not None and r not in reported]
            if ended:
                try:  # a rank flushes its report before it exits: one last look
                    kind, rank, value, tb = results.get(timeout=1.0)
                except queue.Empty:
                    r, code = ended[0]
                    raise RankFailedError(r, f"exited with code {code} without reporting a result") from None
            elif time.monotonic() > deadline:
                running = [r for r, p in enumerate(procs) if p.exitcode is None]
                raise TimeoutError(
                    f"run_ranks: ranks {running} still running after {timeout_s:.0f} s; killed them"
                ) from None
            else:
                continue
        reported.add(rank)
        if kind == "error":
            _blame_silent_death(procs, results, reported, f"then rank {rank}: {value}")
            raise RankFailedError(rank, value, tb)
        values[rank] = value
    return [values[r] for r in range(world_size)]


def _blame_silent_death(procs: list, results: mp.Queue, reported: set[int], then: str) -> None:
    """A rank's error is often the echo of another rank's death (its peer closed the connection): when a rank has
    died without a report (killed, or a hard exit), that rank is the cause and is the one raised."""
    time.sleep(0.5)  # the dead rank's exit and other ranks' reports arrive
    while True:
        try:
            reported.add(results.get_nowait()[1])
        except queue.Empty:
            break
    for r, p in enumerate(procs):
        if p.exitcode not in (None, 0) and r not in reported:
            raise RankFailedError(r, f"exited with code {p.exitcode} without reporting a result ({then})")


def _stop(procs: list, grace_s: float) -> None:
    """SIGTERM every live rank, SIGKILL whoever outlives ``grace_s``, reap them all."""
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.exitcode is None:
            p.kill()
            p.join()
