"""``gathered_logits`` on Triton kernels: ``out[n, k] = <q[n], c[index[n, k]]>`` and its gradients, with no
``[N, K, D]`` gather in memory and no atomics.

Why: the chunked PyTorch form gathers ``c[index]`` chunk by chunk (written, then read by a bmm), and its backward
forms the ``[chunk, K, D]`` fp32 products ``g * q`` and scatters them into grad_c with ``index_add_`` (one atomic add
per element): on an H200 at N = 64k, K = 32, D = 512 that was ~13-15 ms of a 103 ms training step for ~1 GFLOP of
work. Here each pass reads the picked rows once, straight from ``q`` / ``c`` (see ``gathered_logits_kernels``):

- forward and grad_q: by query (one gathered candidate row per pick);
- grad_c: the picks sorted by candidate once (a stable sort of the int32 index, then the CSR row offsets by binary
  search: no host sync, so CUDA-graph capturable), each candidate's run cut into segments of at most
  ``Blocks.grad_c_segment`` picks; one program per segment sums ``g * q`` in fp32 in a fixed order and writes the
  candidate's row once (runs of one segment, all of them in a uniform draw) or a partial row that a second kernel
  sums in order (a candidate picked very often): deterministic, no atomics, and a popular candidate spread over
  many programs.

Numerics: products and sums in fp32, outputs rounded once to the operands' dtype (the PyTorch path rounds each
``g * q`` term to the operands' dtype before its fp32 sum; here terms stay fp32).

CUDA tensors run ``gathered_logits_kernels`` compiled; CPU tensors run a second copy of that module loaded with the
Triton interpreter on (tests), leaving the process-wide ``TRITON_INTERPRET`` setting alone. Triton is imported on
first use only, so installs without it never touch this module's kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import gr_kernels
from gr_kernels.triton_interpreter import KernelModules

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRETED_NAME = "gr_models.retrieval._interpreted_gathered_logits_kernels"
INT32_MAX = 2**31 - 1


triton_available = gr_kernels.triton_available


@dataclass(frozen=True)
class Blocks:
    """Tile sizes (powers of two) and warps of the three kernels; a ``*_d`` block is capped at D rounded up to a
    power of two."""

    fwd_picks: int = 64
    fwd_d: int = 128
    fwd_warps: int = 4
    grad_q_rows: int = 32
    grad_q_d: int = 128
    grad_q_warps: int = 4
    grad_c_picks: int = 16
    grad_c_d: int = 512  # full rows at D = 512: 1.14 ms vs 1.96 ms at 256 (H200, N = 64k, K = 32, bf16, with the plan)
    grad_c_warps: int = 4
    grad_c_segment: int = 256  # most picks one grad_c program sums (a longer run is split, its partials combined)
    combine_rows: int = 16  # [16, 512] fp32 partial tiles: no spills at 4 warps (32 rows would take 254 registers)

    def __post_init__(self) -> None:
        for name in ("fwd_picks", "fwd_d", "grad_q_rows", "grad_q_d", "grad_c_picks", "grad_c_d", "combine_rows"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"Blocks.{name} must be a power of two, got {v}")
        if self.grad_c_segment < 1:
            raise ValueError(f"Blocks.grad_c_segment must be >= 1, got {self.grad_c_segment}")


DEFAULT_BLOCKS = Blocks()
# Interpreter (CPU tests): small tiles, so small shapes already span several tiles, tails and D chunks.
INTERPRETER_BLOCKS = Blocks(fwd_picks=8, fwd_d=8, grad_q_rows=4, grad_q_d=8, grad_c_picks=4, grad_c_d=8,
                            grad_c_segment=8, combine_rows=2)  # fmt: skip


# ``gathered_logits_kernels.py`` compiled (CUDA tensors) and imported a second time with the interpreter on (CPU).
_kernels = KernelModules("gr_models.retrieval.gathered_logits_kernels", _INTERPRETED_NAME).for_device


def _blocks(device: torch.device, blocks: Blocks | None) -> Blocks:
    if blocks is not None:
        return blocks
    return DEFAULT_BLOCKS if device.type == "cuda" else INTERPRETER_BLOCKS


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def _block_d(d: int, cap: int) -> int:
    return min(cap, _pow2_at_least(d))


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.numel() == 0 else t.contiguous()


def check_operands(queries: torch.Tensor, candidates: torch.Tensor, index: torch.Tensor) -> None:
    """What the kernels need beyond ``gathered_logits``' shape checks: one supported dtype, one device, and every
    index in ``[0, M)`` (asserted on the device without a host sync, like an out-of-range gather on CUDA)."""
    if queries.dtype != candidates.dtype or queries.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"Triton gathered_logits needs queries and candidates of one dtype in {SUPPORTED_DTYPES}, got "
            f"{queries.dtype} and {candidates.dtype}"
        )
    if not (queries.device == candidates.device == index.device):
        raise ValueError(
            f"gathered_logits tensors must share a device, got {queries.device}, {candidates.device}, {index.device}"
        )
    if candidates.size(0) > INT32_MAX:
        raise ValueError(f"Triton gathered_logits sorts picks by int32 candidate id: {candidates.size(0)} rows")
    if index.numel():
        lo, hi = torch.aminmax(index)
        torch._assert_async(
            (lo >= 0) & (hi < candidates.size(0)), f"gathered_logits index out of range [0, {candidates.size(0)})"
        )


def forward(queries: torch.Tensor, candidates: torch.Tensor, index: torch.Tensor, blocks: Blocks | None = None):
    """``[N, K]`` logits in the operands' dtype (``queries`` / ``candidates`` already of one dtype)."""
    n, k = index.shape
    d = queries.size(1)
    out = torch.empty(n, k, dtype=queries.dtype, device=queries.device)
    if out.numel() == 0:
        return out
    if d == 0:
        return out.zero_()
    b = _blocks(queries.device, blocks)
    q, c, idx = _rows_contiguous(queries), _rows_contiguous(candidates), index.contiguous()
    block_d = _block_d(d, b.fwd_d)
    _kernels(q.device).gathered_logits_fwd_kernel[(_cdiv(n * k, b.fwd_picks),)](
        q, c, idx, out, n * k, q.stride(0), c.stride(0),
        K=k, D=d, BLOCK_P=b.fwd_picks, BLOCK_D=block_d, EVEN_D=d % block_d == 0, num_warps=b.fwd_warps,
    )  # fmt: skip
    return out


def grad_queries(grad: torch.Tensor, candidates: torch.Tensor, index: torch.Tensor, blocks: Blocks | None = None):
    """``grad_q[n] = sum_k grad[n, k] * c[index[n, k]]`` in the candidates' dtype (fp32 sums)."""
    n, k = index.shape
    d = candidates.size(1)
    grad_q = torch.empty(n, d, dtype=candidates.dtype, device=candidates.device)
    if grad_q.numel() == 0:
        return grad_q
    if k == 0:
        return grad_q.zero_()
    b = _blocks(candidates.device, blocks)
    c, idx, g = _rows_contiguous(candidates), index.contiguous(), grad.contiguous()
    block_d = _block_d(d, b.grad_q_d)
    _kernels(c.device).gathered_logits_grad_q_kernel[(_cdiv(n, b.grad_q_rows), _cdiv(d, block_d))](
        g, c, idx, grad_q, n, c.stride(0), grad_q.stride(0),
        K=k, D=d, BLOCK_N=b.grad_q_rows, BLOCK_D=block_d, EVEN_D=d % block_d == 0, num_warps=b.grad_q_warps,
    )  # fmt: skip
    return grad_q


def picks_by_candidate(index: torch.Tensor, num_candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of the picks grouped by candidate: ``order`` (flat pick ids ``n * K + k``, by candidate, in pick order
    within one) and ``offsets`` ``[M + 1]`` (candidate ``m``'s picks are ``order[offsets[m]:offsets[m + 1]]``)."""
    keys = index.reshape(-1).to(torch.int32)
    sorted_keys, order = torch.sort(keys, stable=True)
    bounds = torch.arange(num_candidates + 1, dtype=torch.int32, device=index.device)
    return order, torch.searchsorted(sorted_keys, bounds)


@dataclass(frozen=True)
class SegmentPlan:
    """The CSR runs cut into segments of at most ``segment`` picks (device tensors, built without a host sync; the
    grids are upper bounds, their surplus programs see an owner ``== M`` and write nothing)."""

    order: torch.Tensor  # [N * K] flat pick ids, by candidate
    offsets: torch.Tensor  # [M + 1] run bounds in ``order``
    owner: torch.Tensor  # [M + N * K // segment] candidate of each segment program (M: none)
    seg_first: torch.Tensor  # [M] first segment program of each candidate
    num_segments: torch.Tensor  # [M] segments of each run (1 for a run without picks: it writes zeros)
    partial_row: torch.Tensor  # [M] first partial row of each multi-segment run
    multi_owner: torch.Tensor  # [N * K // (segment + 1) + 1] the multi-segment candidates in order (M: none)
    num_partial_rows: int  # bound on the partial rows of all multi-segment runs


def segment_plan(index: torch.Tensor, num_candidates: int, segment: int) -> SegmentPlan:
    order, offsets = picks_by_candidate(index, num_candidates)
    picks = index.numel()
    counts = offsets[1:] - offsets[:-1]
    num_segments = ((counts + segment - 1) // segment).clamp_min_(1)
    seg_end = num_segments.cumsum(0)
    # sum over m of max(1, ceil(c_m / S)) <= sum of (1 + c_m // S) <= M + N*K // S
    programs = torch.arange(num_candidates + picks // segment, device=index.device)
    owner = torch.searchsorted(seg_end, programs, right=True)
    multi = num_segments > 1
    multi_segments = num_segments * multi
    partial_row = multi_segments.cumsum(0) - multi_segments
    # A multi-segment run has > S picks: at most N*K // (S + 1) of them, ceil(c / S) < 2 c / S rows each.
    ranks = torch.arange(picks // (segment + 1) + 1, device=index.device)
    multi_owner = torch.searchsorted(multi.cumsum(0), ranks, right=True)
    return SegmentPlan(order, offsets, owner, seg_end - num_segments, num_segments, partial_row, multi_owner,
                       2 * picks // segment + 1)  # fmt: skip


def grad_candidates(
    grad: torch.Tensor, queries: torch.Tensor, index: torch.Tensor, num_candidates: int, blocks: Blocks | None = None
):
    """``grad_c[m] = sum over picks (n, k) of m of grad[n, k] * q[n]`` in the queries' dtype (fp32 sums)."""
    n, k = index.shape
    d = queries.size(1)
    grad_c = torch.empty(num_candidates, d, dtype=queries.dtype, device=queries.device)
    if grad_c.numel() == 0:
        return grad_c
    if n * k == 0:
        return grad_c.zero_()
    b = _blocks(queries.device, blocks)
    plan = segment_plan(index, num_candidates, b.grad_c_segment)
    partial = torch.empty(plan.num_partial_rows, d, dtype=torch.float32, device=queries.device)
    q, g = _rows_contiguous(queries), grad.contiguous()
    kernels = _kernels(q.device)
    block_d = _block_d(d, b.grad_c_d)
    kernels.gathered_logits_grad_c_kernel[(plan.owner.numel(), _cdiv(d, block_d))](
        g, q, plan.order, plan.offsets, plan.owner, plan.seg_first, plan.partial_row, grad_c, partial,
        num_candidates, q.stride(0), grad_c.stride(0), b.grad_c_segment,
        K=k, D=d, BLOCK_P=b.grad_c_picks, BLOCK_D=block_d, EVEN_D=d % block_d == 0, num_warps=b.grad_c_warps,
    )  # fmt: skip
    kernels.gathered_logits_grad_c_combine_kernel[(plan.multi_owner.numel(), _cdiv(d, block_d))](
        partial, plan.multi_owner, plan.partial_row, plan.num_segments, grad_c, num_candidates, grad_c.stride(0),
        D=d, BLOCK_R=b.combine_rows, BLOCK_D=block_d, num_warps=b.grad_c_warps,
    )  # fmt: skip
    return grad_c


class TritonGatheredLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries: torch.Tensor, candidates: torch.Tensor, index: torch.Tensor, blocks: Blocks | None):  # type: ignore[override]
        ctx.save_for_backward(queries, candidates, index)
        ctx.blocks = blocks
        return forward(queries, candidates, index, blocks)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        queries, candidates, index = ctx.saved_tensors
        grad = grad.to(queries.dtype)
        grad_q = grad_queries(grad, candidates, index, ctx.blocks) if ctx.needs_input_grad[0] else None
        want_c = ctx.needs_input_grad[1]
        grad_c = grad_candidates(grad, queries, index, candidates.size(0), ctx.blocks) if want_c else None
        return grad_q, grad_c, None, None


@torch.compiler.disable  # a graph break under torch.compile: Dynamo would trace into Triton's launcher
def triton_gathered_logits(
    queries: torch.Tensor, candidates: torch.Tensor, index: torch.Tensor, blocks: Blocks | None = None
) -> torch.Tensor:
    """``[N, K]`` logits with autograd, operands already of one supported dtype (``gathered_logits`` does the shape
    checks and the autocast dtype); CPU tensors run the interpreted kernels."""
    if not triton_available():
        raise RuntimeError("Triton gathered_logits needs the triton package (pip install triton)")
    check_operands(queries, candidates, index)
    return TritonGatheredLogits.apply(queries, candidates, index, blocks)
