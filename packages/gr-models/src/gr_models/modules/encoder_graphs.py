"""CUDA-graph replay of an HSTU encoder's training forward and backward (``HSTUConfig.cuda_graphs``).

Why: a training step of 8 HSTU blocks issues ~40 small ops per block each way, and on an H200 the host spends about as
long issuing them (Python, autograd, op wrappers, Triton launches: ~1.4 ms a block forward) as the device spends
running them. The host, not the GPU, then sets the pace, and more so under data parallelism, where TorchRec's sparse
dist adds host work to every step. A CUDA graph issues the encoder's whole forward, and another its whole backward,
in one launch each.

A graph replays fixed shapes and addresses, and jagged batches vary. So a batch is padded to a *bucket*
(``bucket_rows``: the row count rounded up to 1/32 of its power-of-two octave, at most ~3% padded rows) and its
inputs are copied into static buffers that every graph of the encoder shares:

- the padded rows form sequences of their own (at most ``PAD_SEQ_LEN`` rows each, empty when not needed), so the real
  sequences' outputs and gradients are those of the unpadded batch: attention never crosses a sequence, the padded
  rows' output gradient is zero, and their inputs are zeroed so every padded value is finite (``0 * finite = 0`` in
  the weight gradients);
- the attention's ``max_seq_len`` is the batch's, rounded up to ``LEN_GRANULE`` (an upper bound is all it is).

Memory: all graphs of an encoder capture into one memory pool, and the activations the forward saves for the backward
are released after the capture, so the buckets' graphs reuse the same activation memory (a bucket keeps only its
parameter gradients; the static input/output buffers are shared and grow with the largest bucket seen). That is safe
because a graphed forward replays only when no other graphed forward's backward is pending: a forward while one is
pending (two forwards before one backward, e.g. gradient accumulation that sums the losses first) runs eagerly, and
a backward that would read activations another forward has since overwritten (``retain_graph`` and a second
backward) is an error.

What runs eagerly instead (same results): empty batches, eval/no-grad calls, CPU tensors, compiled or exported code,
blocks that are not plain ``HSTUBlock`` (tensor-parallel conversions), and attention dropout (its seed is drawn on the
host, so a graph would replay one mask). The encoder's output is a view of a static buffer that the next graphed
forward of the same encoder overwrites: clone it to keep it past the step (the retrieval and ranking models normalise
or project it first, which copies).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gr_models.transfer import to_device

if TYPE_CHECKING:
    from gr_models.modules.hstu import HSTUEncoder

log = logging.getLogger("gr_models")

ROWS_PER_OCTAVE = 32  # buckets per power-of-two range of row counts: at most 1/32 = ~3% padded rows
MIN_ROW_GRANULE = 256
PAD_SEQ_LEN = 256  # longest padding sequence (shorter when max_seq_len is): keeps its attention cost negligible
LEN_GRANULE = 256  # max_seq_len rounded up to this (not beyond the encoder's own max_seq_len)
WARMUP_STEPS = 2  # eager forward+backward passes on a side stream before capturing (cuBLAS, Triton compiles)
DEFAULT_MAX_GRAPHS = 32


def _row_granule(rows: int) -> int:
    """The bucket step around ``rows`` rows: ``max(MIN_ROW_GRANULE, 2^floor(log2(rows)) / ROWS_PER_OCTAVE)``."""
    return max(MIN_ROW_GRANULE, (1 << (rows.bit_length() - 1)) // ROWS_PER_OCTAVE)


def bucket_rows(rows: int) -> int:
    """The padded row count of a batch of ``rows`` rows: rounded up to its ``_row_granule``."""
    if rows < 1:
        raise ValueError(f"a graphed encoder batch needs at least one row, got {rows}")
    granule = _row_granule(rows)
    return -(-rows // granule) * granule


def bucket_len(max_seq_len: int, limit: int) -> int:
    """``max_seq_len`` rounded up to ``LEN_GRANULE``, but not beyond ``limit`` (nor below ``max_seq_len``)."""
    return max(max_seq_len, min(-(-max_seq_len // LEN_GRANULE) * LEN_GRANULE, limit))


def padding_offsets(rows: int, padded_rows: int, pad_len: int) -> list[int]:
    """The end offsets of the padding sequences that fill rows ``[rows, padded_rows)``: ``ceil(bucket granule /
    pad_len)`` of them at most, each at most ``pad_len`` rows (the trailing ones empty). The count depends only on
    the bucket, so the offsets tensor has a fixed length per bucket."""
    count = padding_seqs(padded_rows, pad_len)
    return [min(rows + pad_len * (i + 1), padded_rows) for i in range(count)]


def padding_seqs(padded_rows: int, pad_len: int) -> int:
    """How many padding sequences a bucket of ``padded_rows`` rows carries (enough for any batch that lands in it)."""
    return -(-_row_granule(padded_rows) // pad_len)


@dataclass(frozen=True)
class _Key:
    """What a captured graph depends on besides parameter addresses."""

    rows: int
    num_seqs: int  # real sequences; padding ones come after
    pad_seqs: int
    pad_len: int
    max_seq_len: int
    dim: int
    dtype: torch.dtype
    offsets_dtype: torch.dtype
    contextual_seq_len: int
    has_targets: bool
    has_positions: bool
    autocast: tuple[bool, torch.dtype]
    requires_grad: tuple[bool, ...]


class _StaticIO:
    """The buffers every graph of an encoder reads and writes, sized for the largest bucket seen."""

    def __init__(self, rows: int, seqs: int, dim: int, dtype: torch.dtype, offsets_dtype: torch.dtype, device) -> None:
        self.rows, self.seqs, self.dim, self.dtype, self.offsets_dtype = rows, seqs, dim, dtype, offsets_dtype
        f = {"device": device, "dtype": dtype}
        i64 = {"device": device, "dtype": torch.int64}
        self.x = torch.zeros(rows, dim, **f)
        self.out = torch.zeros(rows, dim, **f)
        self.grad_out = torch.zeros(rows, dim, **f)
        self.grad_x = torch.zeros(rows, dim, **f)
        self.timestamps = torch.zeros(rows, **i64)
        self.query_timestamps = torch.zeros(rows, **i64)
        self.positions = torch.zeros(rows, **i64)
        self.offsets = torch.zeros(seqs + 1, device=device, dtype=offsets_dtype)
        self.num_targets = torch.zeros(seqs, **i64)

    def fits(self, rows: int, seqs: int, dim: int, dtype: torch.dtype, offsets_dtype: torch.dtype) -> bool:
        return (
            rows <= self.rows
            and seqs <= self.seqs
            and (dim, dtype, offsets_dtype) == (self.dim, self.dtype, self.offsets_dtype)
        )


class _Graphs:
    """One bucket's forward and backward graphs and the parameter gradients its backward writes."""

    def __init__(self, forward: torch.cuda.CUDAGraph, backward: torch.cuda.CUDAGraph, param_grads: list) -> None:
        self.forward, self.backward, self.param_grads = forward, backward, param_grads


class _Token:
    """Alive while a graphed forward's autograd node is: marks its backward as pending."""


class EncoderGraphs:
    """The CUDA graphs of one ``HSTUEncoder`` (one per bucket, least recently used dropped beyond ``max_graphs``)."""

    def __init__(self, max_graphs: int = DEFAULT_MAX_GRAPHS) -> None:
        from gr_models.inference.lru import LruDict  # lazy: gr_models.inference imports this package

        self.graphs: LruDict[_Key, _Graphs] = LruDict(max_graphs)
        self.io: _StaticIO | None = None
        self.pool = None
        self.param_ptrs: tuple[int, ...] = ()
        self.captures = 0  # graphs captured so far (tests, logs)
        self.replays = 0
        self._pending: weakref.ref | None = None  # the token of the forward whose backward has not run
        self._last_forward: weakref.ref | None = None
        self._logged: set[str] = set()

    # Graphs and buffers are device state of this process: copies (deepcopy, pickling) start empty.
    def __getstate__(self) -> dict[str, Any]:
        return {"max_graphs": self.graphs.limit}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_graphs"])

    def __deepcopy__(self, memo: dict) -> EncoderGraphs:
        return EncoderGraphs(self.graphs.limit)

    def clear(self) -> None:
        self.graphs.clear()
        self.io = None
        self.pool = None

    # ------------------------------------------------------------------ when
    def eager_reason(self, encoder: HSTUEncoder, x: Tensor) -> str | None:
        """Why this call runs eagerly, or None when it replays a graph."""
        from gr_models.modules.hstu import HSTUBlock

        if x.shape[0] == 0:
            return "empty"  # nothing to replay (and no bucket holds zero rows)
        if not x.is_cuda:
            return "cpu"
        if not (encoder.training and torch.is_grad_enabled()):
            return "eval"
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return "compiled"
        if torch.cuda.is_current_stream_capturing():
            return "capturing"
        if encoder.config.attn_dropout > 0.0:
            return "attention dropout draws its seed on the host; a graph would replay one mask"
        if any(type(b) is not HSTUBlock or b._forward_hooks or b._forward_pre_hooks for b in encoder.blocks):
            return "blocks that are not plain HSTUBlocks (tensor parallel, hooks) run eagerly"
        pending = self._pending() if self._pending is not None else None
        if pending is not None:
            return "pending"
        return None

    def note(self, reason: str) -> None:
        """Logs once per reason why calls run eagerly (the routine ones, empty/cpu/eval/pending, silently)."""
        if reason in ("empty", "cpu", "eval", "compiled", "capturing", "pending") or reason in self._logged:
            return
        self._logged.add(reason)
        log.info("HSTUEncoder CUDA graphs: running eagerly: %s", reason)

    # ------------------------------------------------------------------ run
    def run(
        self,
        encoder: HSTUEncoder,
        x: Tensor,
        seq_offsets: Tensor,
        max_seq_len: int,
        timestamps: Tensor,
        query_timestamps: Tensor,
        num_targets: Tensor | None,
        contextual_seq_len: int,
        positions: Tensor | None,
    ) -> Tensor:
        """The encoder's output for these (already validated) inputs, through the bucket's graphs."""
        rows, dim = x.shape
        num_seqs = seq_offsets.numel() - 1
        padded = bucket_rows(rows)
        n = bucket_len(max_seq_len, encoder.config.max_seq_len)
        pad_len = min(PAD_SEQ_LEN, n)
        pad_seqs = padding_seqs(padded, pad_len)
        params = list(encoder.parameters())
        ptrs = tuple(p.data_ptr() for p in params)
        if ptrs != self.param_ptrs:  # parameters moved (.to, reassigned): every graph reads stale addresses
            self.clear()
            self.param_ptrs = ptrs
        key = _Key(
            rows=padded,
            num_seqs=num_seqs,
            pad_seqs=pad_seqs,
            pad_len=pad_len,
            max_seq_len=n,
            dim=dim,
            dtype=x.dtype,
            offsets_dtype=seq_offsets.dtype,
            contextual_seq_len=contextual_seq_len,
            has_targets=num_targets is not None,
            has_positions=positions is not None,
            autocast=(torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")),
            requires_grad=tuple(p.requires_grad for p in params),
        )
        seqs = num_seqs + pad_seqs
        if self.io is None or not self.io.fits(padded, seqs, dim, x.dtype, seq_offsets.dtype):
            # Grow (with headroom) and recapture: every graph holds the old buffers' addresses.
            self.clear()
            grow = (lambda v: v) if self.io is None else (lambda v: v + v // 4)
            self.io = _StaticIO(grow(padded), grow(seqs), dim, x.dtype, seq_offsets.dtype, x.device)
        io = self.io
        self._stage(io, key, x, seq_offsets, timestamps, query_timestamps, num_targets, positions, rows)
        used = [p for p in params if p.requires_grad]
        graphs = self.graphs.lookup(key)
        if graphs is None:
            graphs = self.graphs.store(key, self._capture(encoder, key, used))
        return _GraphedEncoder.apply(self, graphs, rows, padded, x, *used)

    @staticmethod
    def _stage(io, key: _Key, x, seq_offsets, timestamps, query_timestamps, num_targets, positions, rows) -> None:
        """Copies a batch into the static buffers: real rows first, then the padding sequences' rows (zeroed)."""
        b, padded = key.num_seqs, key.rows
        io.x[:rows].copy_(x.detach())
        io.x[rows:padded].zero_()
        io.offsets[: b + 1].copy_(seq_offsets)
        # Through gr_models.transfer (pinned memory): from pageable memory the driver may wait for the stream.
        tail = torch.tensor(padding_offsets(rows, padded, key.pad_len), dtype=io.offsets.dtype)
        io.offsets[b + 1 : b + 1 + key.pad_seqs].copy_(to_device(tail, io.offsets.device))
        io.timestamps[:rows].copy_(timestamps)
        io.query_timestamps[:rows].copy_(query_timestamps)
        if positions is not None:
            io.positions[:rows].copy_(positions)
            io.positions[rows:padded].zero_()
        if num_targets is not None:
            io.num_targets[:b].copy_(num_targets)
            io.num_targets[b : b + key.pad_seqs].zero_()

    def _inputs(self, key: _Key) -> dict[str, Any]:
        io, r, s = self.io, key.rows, key.num_seqs + key.pad_seqs
        return {
            "seq_offsets": io.offsets[: s + 1],
            "max_seq_len": key.max_seq_len,
            "timestamps": io.timestamps[:r],
            "query_timestamps": io.query_timestamps[:r],
            "num_targets": io.num_targets[:s] if key.has_targets else None,
            "contextual_seq_len": key.contextual_seq_len,
            "positions": io.positions[:r] if key.has_positions else None,
        }

    def _capture(self, encoder: HSTUEncoder, key: _Key, used: list) -> _Graphs:
        """Warm-up passes on a side stream, then the forward and backward graphs of bucket ``key``; ``used``: the
        parameters that get gradients."""
        io = self.io
        x = io.x[: key.rows].detach().requires_grad_(True)
        inputs = self._inputs(key)
        grad_out = io.grad_out[: key.rows]
        enabled, dtype = key.autocast
        # The autocast cache would let the capture read weight casts made before it (stale after optimizer steps).
        cast = torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False)

        def forward() -> Tensor:
            with cast:
                return encoder.encode(x, validate=False, **inputs)

        def backward(y: Tensor) -> tuple:
            return torch.autograd.grad(y, [x, *used], grad_out, allow_unused=True)

        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                backward(forward())
        current.wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(fwd, pool=self.pool, capture_error_mode="thread_local"):
            y = forward()
            with torch.no_grad():  # else the buffer records a CopySlices node that keeps y's autograd graph alive
                io.out[: key.rows].copy_(y)
        with torch.cuda.graph(bwd, pool=self.pool, capture_error_mode="thread_local"):
            grads = backward(y)
            if grads[0] is None:
                io.grad_x[: key.rows].zero_()
            else:
                io.grad_x[: key.rows].copy_(grads[0])
        # y and the saved activations are released here: later captures reuse their memory (see the module doc).
        param_grads = list(grads[1:])
        del y, grads
        self.captures += 1
        log.info(
            "HSTUEncoder CUDA graphs: captured bucket rows=%d seqs=%d+%d max_seq_len=%d (%d graphs)",
            key.rows, key.num_seqs, key.pad_seqs, key.max_seq_len, len(self.graphs) + 1,
        )  # fmt: skip
        return _Graphs(fwd, bwd, param_grads)

    # ------------------------------------------------------------------ autograd hooks
    def begin_forward(self) -> _Token:
        token = _Token()
        self._pending = weakref.ref(token)
        self._last_forward = weakref.ref(token)
        self.replays += 1
        return token

    def begin_backward(self, token: _Token) -> None:
        last = self._last_forward() if self._last_forward is not None else None
        if last is not token:
            raise RuntimeError(
                "HSTUEncoder CUDA graphs: this backward's activations were overwritten by a later graphed forward "
                "(a second backward through the same step, retain_graph=True): set HSTUConfig.cuda_graphs=False "
                "for double backward"
            )
        self._pending = None


class _GraphedEncoder(torch.autograd.Function):
    """Replays a bucket's forward graph; its backward replays the backward graph. The inputs were staged already."""

    @staticmethod
    def forward(ctx, owner: EncoderGraphs, graphs: _Graphs, rows: int, padded: int, x: Tensor, *params: Tensor):  # type: ignore[override]
        graphs.forward.replay()
        ctx.owner, ctx.graphs, ctx.rows, ctx.padded = owner, graphs, rows, padded
        ctx.token = owner.begin_forward()
        ctx.x_needs_grad = x.requires_grad
        return owner.io.out[:rows]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        owner, io = ctx.owner, ctx.owner.io
        owner.begin_backward(ctx.token)
        io.grad_out[: ctx.rows].copy_(grad)
        io.grad_out[ctx.rows : ctx.padded].zero_()
        ctx.graphs.backward.replay()
        dx = io.grad_x[: ctx.rows] if ctx.x_needs_grad else None
        return (None, None, None, None, dx, *ctx.graphs.param_grads)
