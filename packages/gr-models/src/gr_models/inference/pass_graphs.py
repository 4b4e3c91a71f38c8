"""CUDA-graph replay of the scorer's encoder passes: a cache hit without per-op launch overhead.

A cache hit's encoder pass is ~20 small ops per HSTU block on a few hundred query rows; on a GPU the host spends far
longer issuing them than the device running them (H200, 8 blocks of dim 512: ~5 ms of launches for well under 1 ms of
kernels). A CUDA graph issues the whole pass at once, but replays fixed shapes and addresses. So a pass is padded to a
bucket (``pass_shape``): one padding sequence is appended whose keys are pool slot 0 and whose queries read input
row 0 -- every padded row belongs to a sequence of its own, so the real sequences' outputs are untouched (the
padding sequence's outputs are computed and dropped) -- and the index tensors, the input rows and the bias buffer
live in static buffers that each request refills (``PassGraphs.run``: one host-to-device copy of the indices, one
copy of the input rows, one replay). The indices are packed straight into a pinned host buffer kept per bucket (no
temporary concatenation, no pinned allocation per request); a request that finds that buffer still being copied by
an earlier one (the device behind) stages through a fresh pinned buffer instead, so the host never waits.

Bucket granules trade recaptures against padded work: 64 query/candidate rows, 256 keys and 256 of sequence length.
Graphs are kept per bucket, least recently used first out beyond ``max_graphs`` (each holds its key buffer
``[L, keys, H, D]`` x 2 and its bias buffer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from gr_models.inference.lru import LruDict

Q_GRANULE = 64
KEY_GRANULE = 256
LEN_GRANULE = 256
X_GRANULE = 256


def round_up(n: int, granule: int) -> int:
    """``n`` rounded up to a multiple of ``granule``."""
    return -(-n // granule) * granule


@dataclass(frozen=True)
class PassShape:
    """A padded pass: ``num_seqs`` sequences (the last one padding), ``keys`` key rows and ``queries`` query rows in
    all, ``candidates`` output rows, the longest sequence ``max_len`` and query run ``max_q``, ``x_rows`` input rows;
    with ``pad_past`` pool rows and ``pad_queries`` query rows in the padding sequence."""

    num_seqs: int
    keys: int
    queries: int
    candidates: int
    max_len: int
    max_q: int
    x_rows: int
    pad_past: int
    pad_queries: int
    need_output: bool

    @property
    def bucket(self) -> tuple:
        """What a captured graph depends on: every size but the padding split (that is data: offsets, indices)."""
        return (self.num_seqs, self.keys, self.queries, self.candidates, self.max_len, self.max_q, self.x_rows,
                self.need_output)  # fmt: skip


def pass_shape(lengths: list[int], num_q: list[int], candidates: int, x_rows: int, *, need_output: bool) -> PassShape:
    """The bucket of a pass whose sequences have ``lengths`` keys and ``num_q`` queries each."""
    keys, queries = sum(lengths), sum(num_q)
    q_b = round_up(queries, Q_GRANULE)
    pad_q = q_b - queries
    k_b = round_up(keys + pad_q, KEY_GRANULE)
    pad_past = k_b - keys - pad_q
    return PassShape(
        num_seqs=len(lengths) + 1,
        keys=k_b,
        queries=q_b,
        candidates=round_up(candidates, Q_GRANULE),
        max_len=round_up(max(*lengths, pad_past + pad_q), LEN_GRANULE),
        max_q=round_up(max(*num_q, pad_q), Q_GRANULE),
        x_rows=round_up(max(x_rows, 1), X_GRANULE),
        pad_past=pad_past,
        pad_queries=pad_q,
        need_output=need_output,
    )


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph | None
    packed: torch.Tensor  # int64 indices, the layout of the bucket's pieces
    x: torch.Tensor | None  # [x_rows, D] input rows (None: the pass builds them)
    statics: dict[str, torch.Tensor]  # buffers the pass keeps across replays (e.g. the zeroed bias buffer)
    outputs: tuple[torch.Tensor | None, ...] = ()
    staging: torch.Tensor | None = None  # CUDA: pinned host twin of ``packed``
    staged: torch.cuda.Event | None = None  # CUDA: recorded after the last copy out of ``staging``


class PassGraphs:
    """Per-bucket static buffers and, on CUDA, a captured graph of the pass; on the CPU the same padded pass runs
    eagerly (so CPU tests check the padding the graphs replay)."""

    def __init__(self, max_graphs: int = 8) -> None:
        if not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
        self.max_graphs = max_graphs
        self._entries: LruDict[tuple, _Entry] = LruDict(max_graphs)
        self.captures = 0
        self.replays = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def run(
        self,
        key: tuple,
        names: list[str],
        pieces: list[np.ndarray],
        device: torch.device,
        x: torch.Tensor | None,
        x_rows: int,
        make_statics: Callable[[], dict[str, torch.Tensor]],
        fn: Callable[
            [dict[str, torch.Tensor], torch.Tensor | None, dict[str, torch.Tensor]], tuple[torch.Tensor | None, ...]
        ],
    ) -> tuple[torch.Tensor | None, ...]:
        """``fn(indices, x, statics)`` on this request's ``pieces`` (host int64 NumPy arrays, the bucket's sizes)
        and input rows ``x`` (at most ``x_rows``; None when ``fn`` builds its input rows from the indices, and gets
        None) on ``device``: replayed from the bucket's graph, captured on first use. The outputs are the graph's
        own buffers, valid until the next ``run`` of the same bucket."""
        entry = self._entries.lookup(key)
        if entry is None:
            total = sum(a.size for a in pieces)
            entry = self._entries.store(
                key,
                _Entry(
                    None,
                    torch.empty(total, dtype=torch.int64, device=device),
                    None if x is None else torch.zeros(x_rows, x.shape[1], dtype=x.dtype, device=device),
                    make_statics(),
                ),
            )
        self._fill(entry, pieces, x)
        if device.type == "cuda" and entry.graph is not None:
            entry.graph.replay()  # (the indices' views are the graph's own: nothing to rebuild)
            self.replays += 1
            return entry.outputs
        indices = dict(zip(names, entry.packed.split([a.size for a in pieces]), strict=True))
        if device.type != "cuda":
            return fn(indices, entry.x, entry.statics)
        if entry.graph is None:
            # Warm up on a side stream (lazy initialisation, library handles), then capture.
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                fn(indices, entry.x, entry.statics)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                entry.outputs = fn(indices, entry.x, entry.statics)
            entry.graph = graph
            self.captures += 1
        entry.graph.replay()
        self.replays += 1
        return entry.outputs

    @staticmethod
    def _fill(entry: _Entry, pieces: list[np.ndarray], x: torch.Tensor | None) -> None:
        """The pieces into ``entry.packed`` by one copy (CUDA: non-blocking, from pinned memory), and ``x``."""
        if entry.packed.device.type != "cuda":
            np.concatenate(pieces, out=entry.packed.numpy())
        else:
            if entry.staging is None:
                entry.staging = torch.empty(entry.packed.numel(), dtype=torch.int64, pin_memory=True)
                entry.staged = torch.cuda.Event()
            elif not entry.staged.query():  # an earlier request's copy has not run yet: leave its buffer alone
                entry.staging = torch.empty(entry.packed.numel(), dtype=torch.int64, pin_memory=True)
            np.concatenate(pieces, out=entry.staging.numpy())
            entry.packed.copy_(entry.staging, non_blocking=True)
            entry.staged.record()
        if x is not None and entry.x is not None:
            entry.x[: x.shape[0]].copy_(x)
