"""Launchers of the Triton kernels: argument layout, grids, config choice (a small cached autotune), interpreter.

CUDA tensors run the compiled kernels of ``kernels.py``. Tensors on any other device run a second copy of that
module loaded with the Triton interpreter switched on for the duration of the import only (``@triton.jit`` picks
compiled or interpreted at decoration time), so the process-wide ``TRITON_INTERPRET`` setting, which inductor's own
Triton kernels also read, is never changed.

Backward: dK/dV come from one program per key tile that walks the query tiles with dK and dV in registers (two
passes, dV then dK, at head dim 256: ``configs.split_dkdv``). dQ has two implementations, chosen by
``GR_KERNELS_TRITON_DQ`` (read per call):

- ``separate`` (default): a second kernel, one program per query tile walking the key tiles with dQ in registers
  (it recomputes Q K^T and dO V^T: 7 matrix products per tile pair instead of 5). Chosen for Hopper because its
  cost is plain tensor-core work that the pipelined loop hides loads behind, while the atomic variant adds a
  [BLOCK_M, D] fp32 tile into global memory per key step (4K-16K fp32 adds per step, as ``atom.global.v4.f32`` on sm90)
  from every key-tile program of the sequence, L / BLOCK_N programs contending for the same dQ rows on long
  sequences, plus an fp32 dQ buffer to zero and cast (two more memory passes). It is also deterministic (bit-stable
  gradients, exact CUDA-graph / torch.compile replays). The bias gradient is written by this kernel too (row-major
  stores, coalesced).
- ``atomic``: dQ added by the dK/dV kernel into an fp32 buffer with atomics (5 products), kept because the trade
  depends on GPU, head dim and lengths; ``tools/bench_hstu_attention.py`` measures it as ``triton_atomic_dq``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

from gr_kernels.params import HSTUParams
from gr_kernels.triton_backend import configs
from gr_kernels.triton_backend.configs import TileConfig
from gr_kernels.triton_interpreter import KernelModules

DQ_ENV = "GR_KERNELS_TRITON_DQ"
_DQ_MODES = ("separate", "atomic")
# ``kernels.py`` compiled (CUDA tensors) and imported a second time with the Triton interpreter on (CPU tensors).
_KERNELS = KernelModules("gr_kernels.triton_backend.kernels", "gr_kernels.triton_backend._interpreted_kernels")
compiled_kernels = _KERNELS.compiled
interpreted_kernels = _KERNELS.interpreted


def dq_mode() -> str:
    mode = os.environ.get(DQ_ENV, "separate").strip().lower() or "separate"
    if mode not in _DQ_MODES:
        raise ValueError(f"{DQ_ENV} must be one of {_DQ_MODES}, got {mode!r}")
    return mode


_kernels = _KERNELS.for_device


def _next_pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def _padded_dim(dim: int) -> int:
    return max(16, _next_pow2(dim))


def _seq_bucket(max_seq_len: int) -> int:
    """Sequence-length class of the autotuner's key: tile choice depends on it only coarsely."""
    return min(max(_next_pow2(max_seq_len), 256), 16384)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# Best config per (kernel, device, shape class, variant); filled on first use by timing the candidates.
_CHOSEN: dict[tuple, TileConfig] = {}


def _launch(
    kernel: Callable,
    table: dict[int, tuple[TileConfig, ...]],
    padded_dim: int,
    grid_of: Callable[[TileConfig], tuple[int, int, int]],
    args: tuple,
    constexprs: dict,
    device: torch.device,
    reset: tuple[Tensor, ...] = (),
    key: tuple = (),
) -> None:
    """Launches ``kernel`` with the config chosen for ``key`` (timing each candidate once per key when there are
    several); ``reset`` are buffers the kernel accumulates into, zeroed before every timed launch."""
    interpreted = device.type != "cuda"
    options = configs.candidates(table, padded_dim, interpreted)

    def run(cfg: TileConfig) -> None:
        kernel[grid_of(cfg)](*args, **constexprs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                             num_warps=cfg.num_warps, num_stages=cfg.num_stages)  # fmt: skip

    # The candidates are part of the key: the switches (forced blocks, autotuning off) change them per call.
    full_key = (kernel.__name__, device.index, padded_dim, options, *key, tuple(sorted(constexprs.items())))
    chosen = _CHOSEN.get(full_key)
    if chosen is None and (len(options) == 1 or torch.cuda.is_current_stream_capturing()):
        # No timing (one candidate, or inside CUDA graph capture): the first config that fits this GPU, falling back
        # along the table (its last entry is small) when a larger one exceeds shared memory.
        fallbacks = () if interpreted else tuple(c for c in table[configs.dim_class(padded_dim)] if c != options[0])
        chosen = _first_that_fits(run, (options[0], *fallbacks))
        _CHOSEN[full_key] = chosen
        return
    if chosen is None:
        chosen = _tune(run, options, reset)
        _CHOSEN[full_key] = chosen
    run(chosen)


def _out_of_resources(e: Exception) -> bool:
    return "OutOfResources" in type(e).__name__ or "out of resource" in str(e).lower()


def _first_that_fits(run: Callable[[TileConfig], None], options: tuple[TileConfig, ...]) -> TileConfig:
    """Runs the first of ``options`` that launches (a launch refused for resources writes nothing)."""
    for i, cfg in enumerate(options):
        try:
            run(cfg)
        except Exception as e:
            if not _out_of_resources(e) or i == len(options) - 1:
                raise
        else:
            return cfg
    raise AssertionError("unreachable")


def _tune(run: Callable[[TileConfig], None], options: tuple[TileConfig, ...], reset: tuple[Tensor, ...]) -> TileConfig:
    from triton.testing import do_bench

    timings: dict[TileConfig, float] = {}
    for cfg in options:

        def once(cfg: TileConfig = cfg) -> None:
            for t in reset:
                t.zero_()
            run(cfg)

        try:
            timings[cfg] = do_bench(once, warmup=5, rep=25)
        except Exception as e:  # out of shared memory / registers on this GPU: not a candidate here
            if not _out_of_resources(e):
                raise
    if not timings:
        raise RuntimeError(f"no Triton tile config fits this GPU: {options}")
    for t in reset:
        t.zero_()
    return min(timings, key=timings.__getitem__)


INT32_MAX = 2**31 - 1


def check_offsets_fit(max_rows: int, **tensors: Tensor | None) -> None:
    """The kernels index rows inside a sequence with int32 (``row * row_stride + column``, the sequence start and
    the bias batch/head in int64): raise a clear error when ``max_rows`` rows of a tensor would overflow that."""
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dim() == 4:  # the bias [B, H, N, N]: row * N + column within one (batch, head) slice
            reach = (t.shape[2] - 1) * t.stride(2) + t.shape[3]
        else:
            reach = max(max_rows - 1, 0) * t.stride(0) + (t.shape[1] - 1) * t.stride(1) + t.shape[2]
        if reach > INT32_MAX:
            raise ValueError(
                f"{name} {tuple(t.shape)} with strides {t.stride()}: one sequence spans {reach} elements, beyond the "
                "Triton kernels' 32-bit offsets; use shorter max_seq_len or the reference backend"
            )


def _common(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    num_targets: Tensor | None,
    rab: Tensor | None,
    params: HSTUParams,
    q_offsets: Tensor | None,
) -> tuple[tuple[Tensor, Tensor, Tensor], dict, Tensor, tuple[int, int, int]]:
    """What both directions pass: the int32 (seq offsets, q offsets, num targets) (seq offsets standing in for
    absent ones), the constexprs, the bias in q's dtype (q when there is none: an unused pointer) and its strides."""
    if q_offsets is not None and params.max_q_len < 1:
        raise ValueError(f"delta q (q_offsets) needs params.max_q_len >= 1, got {params.max_q_len}")
    check_offsets_fit(max(params.max_seq_len, params.max_q_len), q=q, k=k, v=v, rab=rab)
    offsets = seq_offsets.to(torch.int32).contiguous()
    seq_tensors = (
        offsets,
        offsets if q_offsets is None else q_offsets.to(torch.int32).contiguous(),
        offsets if num_targets is None else num_targets.to(torch.int32).contiguous(),
    )
    bias = None if rab is None else rab.to(q.dtype).contiguous()
    rab_strides = (0, 0, 0) if bias is None else (bias.stride(0), 0 if bias.shape[1] == 1 else bias.stride(1),
                                                  bias.stride(2))  # fmt: skip
    p = params
    constexprs = {
        "DIM_QK": q.shape[2],
        "DIM_V": v.shape[2],
        "BLOCK_DQK": _padded_dim(q.shape[2]),
        "BLOCK_DV": _padded_dim(v.shape[2]),
        "CAUSAL": bool(p.causal),
        "HAS_WINDOW": p.max_attn_len > 0,
        "HAS_CONTEXT": p.contextual_seq_len > 0,
        "HAS_TARGETS": num_targets is not None,
        "HAS_RAB": bias is not None,
        "DELTA_Q": q_offsets is not None,
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }
    return seq_tensors, constexprs, q if bias is None else bias, rab_strides


def _scalars(p: HSTUParams) -> tuple:
    return (float(p.alpha), 1.0 / p.scaling_seqlen, int(p.max_attn_len), int(p.contextual_seq_len),
            int(p.target_group_size), _seq_bucket(p.max_seq_len))  # fmt: skip


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    num_targets: Tensor | None,
    rab: Tensor | None,
    params: HSTUParams,
    q_offsets: Tensor | None = None,
) -> Tensor:
    """``[total_q, heads, hidden_dim]`` HSTU attention output (see ``gr_kernels.reference.reference_forward``)."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
    num_seqs = seq_offsets.numel() - 1
    if out.numel() == 0 or num_seqs == 0:
        return out.zero_()
    seq_tensors, constexprs, bias_arg, rab_strides = _common(q, k, v, seq_offsets, num_targets, rab, params, q_offsets)
    rows = params.max_seq_len if q_offsets is None else params.max_q_len
    mod = _kernels(q.device)
    args = (q, k, v, bias_arg, out, *seq_tensors,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            *rab_strides, *_scalars(params))  # fmt: skip
    heads = q.shape[1]
    _launch(
        mod.hstu_fwd_kernel,
        configs.FWD,
        max(constexprs["BLOCK_DQK"], constexprs["BLOCK_DV"]),
        lambda cfg: (_cdiv(rows, cfg.block_m), heads, num_seqs),
        args,
        constexprs,
        q.device,
        key=(str(q.dtype), _seq_bucket(params.max_seq_len)),
    )
    return out


def backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    num_targets: Tensor | None,
    rab: Tensor | None,
    params: HSTUParams,
    q_offsets: Tensor | None = None,
    need_drab: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(dq, dk, dv, drab)`` (see ``gr_kernels.reference.reference_backward``); without ``need_drab`` the bias is
    read but its gradient neither computed nor allocated."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    grad_out = _last_dim_contiguous(grad_out.to(q.dtype))
    num_seqs = seq_offsets.numel() - 1
    heads = q.shape[1]
    atomic = dq_mode() == "atomic"
    # dq/dk/dv: every row is written by some program (all rows belong to a sequence); drab only where visited.
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic else torch.empty_like(q)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    drab_mode = 0 if rab is None or not need_drab else (2 if rab.shape[1] == 1 and heads > 1 else 1)
    drab = None
    if drab_mode != 0:
        drab = torch.zeros(rab.shape, dtype=torch.float32 if drab_mode == 2 else q.dtype, device=q.device)
    if q.shape[0] == 0 or k.shape[0] == 0 or num_seqs == 0:
        dk.zero_(), dv.zero_()
        return dq.to(q.dtype), dk, dv, None if drab is None else drab.to(rab.dtype)
    seq_tensors, constexprs, bias_arg, rab_strides = _common(q, k, v, seq_offsets, num_targets, rab, params, q_offsets)
    mod = _kernels(q.device)
    padded = max(constexprs["BLOCK_DQK"], constexprs["BLOCK_DV"])
    rows = params.max_seq_len if q_offsets is None else params.max_q_len
    drab_arg = drab if drab is not None else dq  # an unused pointer when there is no bias
    key = (str(q.dtype), _seq_bucket(params.max_seq_len))
    strides_qkv_do = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                      grad_out.stride(0), grad_out.stride(1))  # fmt: skip
    dkdv_args = (q, k, v, grad_out, dq, dk, dv, bias_arg, drab_arg, *seq_tensors, *strides_qkv_do,
                 dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                 *rab_strides, *_scalars(params))  # fmt: skip
    atomic_buffers = (dq,) + ((drab,) if drab_mode == 2 else ()) if atomic else ()
    # One fused dK/dV pass, or a dV pass then a dK pass (configs.split_dkdv: head dim 256, where the fused one spills).
    for dkdv_pass in (1, 2) if configs.split_dkdv(padded, q.device.type != "cuda") else (0,):
        _launch(
            mod.hstu_bwd_dkdv_kernel,
            configs.DKDV,
            padded,
            lambda cfg: (_cdiv(params.max_seq_len, cfg.block_n), heads, num_seqs),
            dkdv_args,
            {**constexprs, "ATOMIC_DQ": atomic, "DRAB_MODE": drab_mode if atomic else 0, "PASS": dkdv_pass},
            q.device,
            reset=atomic_buffers if dkdv_pass != 1 else (),
            key=key,
        )
    if not atomic:
        dq_args = (q, k, v, grad_out, dq, bias_arg, drab_arg, *seq_tensors, *strides_qkv_do, dq.stride(0),
                   dq.stride(1), *rab_strides, *_scalars(params))  # fmt: skip
        _launch(
            mod.hstu_bwd_dq_kernel,
            configs.DQ,
            padded,
            lambda cfg: (_cdiv(rows, cfg.block_m), heads, num_seqs),
            dq_args,
            {**constexprs, "DRAB_MODE": drab_mode},
            q.device,
            reset=(drab,) if drab_mode == 2 else (),
            key=key,
        )
    return dq.to(q.dtype), dk, dv, None if drab is None else drab.to(rab.dtype)
