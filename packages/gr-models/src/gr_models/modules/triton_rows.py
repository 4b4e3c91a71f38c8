"""What gr-models' row-wise Triton ops (``norm_mul``, ``l2_norm``, ``silu_projection``) share on the host side: where
their kernels run, the dtype they compute in under autocast, the tile of a kernel that holds whole rows, the
row-contiguity they need, and the CUDA device scope of a launch."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def kernel_device(t: Tensor, interpret_on_cpu: bool) -> bool:
    """Whether an op's Triton kernels run on ``t``'s device: CUDA, or CPU through the interpreter when the op's
    ``INTERPRET_ON_CPU`` (a tests' switch) is on."""
    return t.is_cuda or (t.device.type == "cpu" and interpret_on_cpu)


def compute_dtype(t: Tensor, *dtypes: torch.dtype) -> torch.dtype:
    """The autocast dtype when autocast is on for ``t``'s device (what an ``nn.Linear`` there computes in), else the
    promotion of ``dtypes``."""
    kind = t.device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def whole_row_tiles(d: int, device: torch.device) -> tuple[int, int]:
    """(rows per program, padded D) for a kernel holding whole rows of ``d`` elements: ~4k elements per program on the
    GPU; 2 rows in the interpreter, so small tests span several programs and a row tail."""
    block_d = 1 << max(d - 1, 0).bit_length()
    if device.type != "cuda":
        return 2, block_d
    return max(1, 4096 // block_d), block_d


def partial_sum_rows(n: int, block_rows: int, device: torch.device, min_programs: int = 1024) -> int:
    """Rows per program of a whole-row kernel that also sums its rows' columns (one fp32 partial row per program for
    the caller to add up): on the GPU ``block_rows`` times the largest power of two up to 32 that still leaves
    ``min_programs`` programs (several per SM of an H200; fewer, larger programs write and re-read fewer partial rows);
    in the interpreter two steps of ``block_rows``, so small tests cover the loop."""
    if device.type != "cuda":
        return 2 * block_rows
    steps = 1
    while steps < 32 and n // (block_rows * steps * 2) >= min_programs:
        steps *= 2
    return block_rows * steps


def unit_stride_rows(t: Tensor) -> Tensor:
    """``t`` if its rows are contiguous (any row stride), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def device_scope(t: Tensor) -> contextlib.AbstractContextManager:
    """The launch's device as the current CUDA device (Triton launches on the current one); nothing on CPU."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
