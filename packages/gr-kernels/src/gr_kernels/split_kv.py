"""How many key splits the native forward uses ("split KV", flash-decoding for HSTU attention).

HSTU attention has no softmax, so the output is a plain sum over key ranges: when the forward's grid of
(query tile, head, sequence) CTAs is too small to fill the GPU (delta q: a few query rows against thousands of cached
keys), the key tiles of each CTA are divided among ``S`` CTAs that write fp32 partial outputs into a workspace
``[S, total_q, heads, head_dim]`` (allocated here through torch, so CUDA graph capture keeps working) and a reduce
kernel sums them in split order (deterministic). ``S = 1`` is the unsplit kernel, unchanged.

Heuristic (``heuristic_fwd_splits``), for the Hopper kernel's tiles (128 query rows; 128 keys, 64 at head dim 256):
the kernel runs one CTA per SM, so the split grid should be at most one wave: ``S = min(ceil(key_tiles / 2),
num_sms // ctas, 32)`` where ``ctas = q_tiles * heads * batch`` and ``key_tiles`` covers ``max_seq_len`` keys; then
``S`` is lowered to the count of non-empty shares (``ceil(key_tiles / ceil(key_tiles / S))``). Each share keeps at
least two key tiles (one tile would leave the K/V double buffer nothing to overlap and pays a Q load and an fp32
partial store for a single GEMM pair). Grids of more than half a wave get ``S = 1``. The same count is valid for the
SM80-MMA kernel (64-row tiles): any ``S`` is correct, empty shares store zeros.

``GR_KERNELS_FWD_SPLITS`` (read per call): an integer in [1, MAX_FWD_SPLITS] forces that many splits (1 disables),
``auto`` applies the heuristic; unset, the heuristic applies when ``SPLIT_KV_DEFAULT`` is true, else no split.
"""

from __future__ import annotations

import functools
import os

import torch

FWD_SPLITS_ENV = "GR_KERNELS_FWD_SPLITS"
# On: the split path passed the GPU parity suite (tests/gr_kernels/test_split_kv.py, and the forward parity tests
# with GR_KERNELS_FWD_SPLITS=3) and memcheck on an H200, and tools/bench_split_kv.py measured the heuristic 1.4-6.6x
# faster than the unsplit kernel on delta-q calls against 4096 keys (docs/benchmarks/split_kv.md).
SPLIT_KV_DEFAULT = True
MAX_FWD_SPLITS = 256  # what the env switch may force (tests use odd counts past the key tiles)
MAX_HEURISTIC_SPLITS = 32
MIN_TILES_PER_SPLIT = 2
BLOCK_M = 128  # query rows per CTA of the Hopper forward


def key_block(head_dim: int) -> int:
    """Keys per tile of the Hopper forward kernel (hstu/sm90/kernel_traits.h, FwdBlockN)."""
    return 64 if head_dim >= 256 else 128


def heuristic_fwd_splits(batch: int, heads: int, grid_rows: int, max_seq_len: int, head_dim: int, num_sms: int) -> int:
    """Split count for a forward whose grid covers ``grid_rows`` query rows per sequence (``max_q_len`` with delta
    q, else ``max_seq_len``) against up to ``max_seq_len`` keys; 1 when the grid already fills half the GPU."""
    ctas = -(-grid_rows // BLOCK_M) * heads * batch
    key_tiles = -(-max_seq_len // key_block(head_dim))
    if ctas <= 0 or key_tiles <= 0 or num_sms <= 0:
        return 1
    splits = min(-(-key_tiles // MIN_TILES_PER_SPLIT), num_sms // ctas, MAX_HEURISTIC_SPLITS)
    if splits < 2:
        return 1
    per_split = -(-key_tiles // splits)
    return -(-key_tiles // per_split)  # no share left empty


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (read once per device; no sync)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _num_sms(index)


def forced_fwd_splits() -> int | str | None:
    """What ``GR_KERNELS_FWD_SPLITS`` asks for: a count, ``"auto"``, or None when unset/empty."""
    raw = os.environ.get(FWD_SPLITS_ENV, "").strip()
    if raw == "":
        return None
    if raw.lower() == "auto":
        return "auto"
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_FWD_SPLITS:
        raise ValueError(f"{FWD_SPLITS_ENV} must be 'auto' or an integer in [1, {MAX_FWD_SPLITS}], got {raw!r}")
    return value


def fwd_splits(batch: int, heads: int, grid_rows: int, max_seq_len: int, head_dim: int, device: torch.device) -> int:
    """The split count of one native forward call: the env switch, else the heuristic when on by default, else 1."""
    forced = forced_fwd_splits()
    if isinstance(forced, int):
        return forced
    if forced is None and not SPLIT_KV_DEFAULT:
        return 1
    return heuristic_fwd_splits(batch, heads, grid_rows, max_seq_len, head_dim, num_sms(device))
