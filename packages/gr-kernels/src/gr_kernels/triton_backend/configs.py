"""Tile configurations of the Triton kernels: a short, fixed list per kernel and head-dim class.

First use of a (kernel, head-dim class, sequence-length bucket, mask/bias variant) benchmarks only the configs listed
here (two or three per kernel, the first being the default), so a cold start costs a few compilations, seconds rather
than minutes. The lists were chosen for Hopper/Ampere tensor cores:

- forward: 128 query rows per program (one or two warpgroups of wgmma rows); 64 or 128 keys per step, 64 at head
  dim 256 where K/V tiles of 128 keys would not double-buffer in shared memory next to Q.
- backward dK/dV: 64-128 keys per program (the M side of the products it runs), 16-64 query rows per step; at
  head dim 256 it runs as two passes (``split_dkdv``) of one [64, 256] fp32 accumulator each, 32 query rows per
  step (the fused kernel spilled ~850 bytes per thread there, the two passes none).
- backward dQ: the transposed shape, 64-128 query rows per program and 32-64 keys per step.

A last small config in each list always fits (64 x 32 tiles, few stages), so the autotuner has a fallback when a
larger one exceeds shared memory on a smaller GPU (Triton scores such configs as infinitely slow).

Switches (read per call):

- ``GR_KERNELS_TRITON_AUTOTUNE=0``: no benchmarking, the first config of each list.
- ``GR_KERNELS_TRITON_SPLIT_DKDV=0|1``: dK and dV in one pass (0) or in two (1, one fp32 accumulator each); unset:
  two passes from padded head dim 256 up (the fused kernel spills there: two [64, 256] fp32 accumulators plus K
  and V do not fit 255 registers per thread at 8 warps), one below.
- ``GR_KERNELS_TRITON_BLOCKS=M,N``: force BLOCK_M and BLOCK_N of every kernel (tests use it to put tile edges at
  chosen places; powers of two >= 16); implies no autotuning. The interpreter (CPU tensors) uses 16,16 by default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

AUTOTUNE_ENV = "GR_KERNELS_TRITON_AUTOTUNE"
SPLIT_DKDV_ENV = "GR_KERNELS_TRITON_SPLIT_DKDV"
SPLIT_DKDV_MIN_DIM = 256
BLOCKS_ENV = "GR_KERNELS_TRITON_BLOCKS"


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


# Keyed by the padded head dim (max of the q/k and v dims, rounded up to a power of two, at least 64). Each list was
# compiled for sm90 (Triton 3.6, 16-byte aligned inputs) and checked with ptxas: the first entries spill no registers
# (at most 8 bytes), the pipelined loads fit the 227 KB of shared memory.
FWD: dict[int, tuple[TileConfig, ...]] = {
    64: (TileConfig(128, 64, 4, 3), TileConfig(128, 128, 8, 3), TileConfig(64, 32, 4, 2)),
    128: (TileConfig(128, 64, 8, 3), TileConfig(128, 128, 8, 3), TileConfig(64, 32, 4, 2)),
    256: (TileConfig(128, 64, 8, 2), TileConfig(64, 64, 8, 2), TileConfig(64, 32, 4, 1)),
}
DKDV: dict[int, tuple[TileConfig, ...]] = {
    64: (TileConfig(64, 128, 8, 2), TileConfig(32, 128, 8, 2), TileConfig(32, 64, 4, 2)),
    128: (TileConfig(32, 128, 8, 2), TileConfig(64, 64, 8, 2), TileConfig(32, 64, 4, 2)),
    256: (TileConfig(32, 64, 8, 2), TileConfig(16, 64, 8, 2), TileConfig(32, 64, 4, 1)),
}
DQ: dict[int, tuple[TileConfig, ...]] = {
    64: (TileConfig(128, 64, 8, 2), TileConfig(64, 64, 4, 3), TileConfig(64, 32, 4, 2)),
    128: (TileConfig(128, 64, 8, 2), TileConfig(64, 64, 4, 2), TileConfig(64, 32, 4, 2)),
    256: (TileConfig(128, 32, 8, 2), TileConfig(64, 32, 8, 2), TileConfig(64, 32, 4, 1)),
}
INTERPRETER = TileConfig(16, 16, 1, 1)


def dim_class(padded_dim: int) -> int:
    return max(64, padded_dim)


def forced_blocks() -> tuple[int, int] | None:
    """``GR_KERNELS_TRITON_BLOCKS`` as ``(BLOCK_M, BLOCK_N)``, None when unset; a clear error when malformed."""
    raw = os.environ.get(BLOCKS_ENV, "").strip()
    if not raw:
        return None
    try:
        m, n = (int(x) for x in raw.split(","))
    except ValueError:
        m = n = 0
    if not all(x >= 16 and x & (x - 1) == 0 for x in (m, n)):
        raise ValueError(f"{BLOCKS_ENV} must be 'M,N' with powers of two >= 16, got {raw!r}")
    return m, n


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1") != "0" and forced_blocks() is None


def candidates(table: dict[int, tuple[TileConfig, ...]], padded_dim: int, interpreted: bool) -> tuple[TileConfig, ...]:
    """The configs one launch may choose from: the table's list, or exactly one config when autotuning is off, the
    blocks are forced, or the kernel runs in the interpreter."""
    forced = forced_blocks()
    default = INTERPRETER if interpreted else table[dim_class(padded_dim)][0]
    if forced is not None:
        return (TileConfig(forced[0], forced[1], default.num_warps, default.num_stages),)
    if interpreted or not autotune_enabled():
        return (default,)
    return table[dim_class(padded_dim)]


def split_dkdv(padded_dim: int, interpreted: bool) -> bool:
    """Whether the backward runs dV and dK in two passes (see the module docstring); the interpreter follows the
    switch only (both paths are tested there)."""
    raw = os.environ.get(SPLIT_DKDV_ENV, "").strip()
    if raw not in ("", "0", "1"):
        raise ValueError(f"{SPLIT_DKDV_ENV} must be 0 or 1, got {raw!r}")
    if raw:
        return raw == "1"
    return not interpreted and padded_dim >= SPLIT_DKDV_MIN_DIM
