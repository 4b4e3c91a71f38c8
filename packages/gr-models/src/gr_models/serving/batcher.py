"""Dynamic batching: HTTP threads enqueue requests, one worker thread takes them in groups and scores each group.

The worker blocks for a first request, then keeps collecting for up to ``window_s`` or until ``max_batch``
requests, and hands the group to the backend in arrival order (so one user's requests apply in order). Being the
only thread that touches the backend, it also serialises access to the (not thread-safe) scorer. A full queue is
answered 503 at once rather than letting latency grow without bound.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from gr_models.serving.backends import ScoreResult, ScoringBackend
from gr_models.serving.schema import RequestError, ScoreRequest

logger = logging.getLogger(__name__)


@dataclass
class BatcherStats:
    requests: int = 0
    batches: int = 0
    largest_batch: int = 0
    rejected_queue_full: int = 0

    def as_dict(self) -> dict[str, float]:
        mean = self.requests / self.batches if self.batches else 0.0
        return {**self.__dict__, "mean_batch": round(mean, 3)}


class DynamicBatcher:
    def __init__(
        self, backend: ScoringBackend, *, max_batch: int = 32, window_s: float = 0.002, max_queue: int = 1024
    ) -> None:
        if max_batch < 1 or window_s < 0 or max_queue < 1:
            raise ValueError(f"need max_batch >= 1, window_s >= 0, max_queue >= 1, got {max_batch}, {window_s}, "
                             f"{max_queue}")  # fmt: skip
        self.backend = backend
        self.max_batch = max_batch
        self.window_s = window_s
        self._queue: queue.Queue[tuple[ScoreRequest, Future[ScoreResult]] | None] = queue.Queue(max_queue)
        self._thread: threading.Thread | None = None
        self._stats_lock = threading.Lock()
        self.stats = BatcherStats()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("batcher already started")
        self._thread = threading.Thread(target=self._run, name="gr-serve-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finishes the queued requests, then stops the worker."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join()
        self._thread = None

    def submit(self, request: ScoreRequest) -> Future[ScoreResult]:
        if self._thread is None:
            raise RequestError(503, "the scoring worker is not running")
        future: Future[ScoreResult] = Future()
        try:
            self._queue.put_nowait((request, future))
        except queue.Full:
            with self._stats_lock:
                self.stats.rejected_queue_full += 1
            raise RequestError(503, "server overloaded: the request queue is full, retry later") from None
        return future

    def _collect(self, first: tuple[ScoreRequest, Future[ScoreResult]]) -> tuple[list, bool]:
        group, stop = [first], False
        deadline = time.monotonic() + self.window_s
        while len(group) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            group.append(item)
        return group, stop

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            group, stop = self._collect(first)
            with self._stats_lock:
                self.stats.requests += len(group)
                self.stats.batches += 1
                self.stats.largest_batch = max(self.stats.largest_batch, len(group))
            try:
                results = self.backend.score_batch([request for request, _ in group])
            except Exception as exc:  # the backend itself failed: every request of the group gets the error
                logger.exception("scoring backend failed on a batch of %d", len(group))
                results = [exc] * len(group)
            for (_, future), result in zip(group, results, strict=True):
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
