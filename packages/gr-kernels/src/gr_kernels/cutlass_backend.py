"""The native CUDA backend ``"cutlass"``: CuTe tensor-core kernels from ``gr_kernels._C`` (built when nvcc is found).

The extension takes raw device pointers, strides and the current CUDA stream, so it is independent of the torch
version and never synchronises with the host; outputs are allocated through torch's caching allocator, which keeps
it usable under CUDA graph capture.

Status: forward native for head dims 64/128/256 (the Hopper WGMMA/TMA kernel on sm90, ``GR_KERNELS_FWD_KERNEL=sm80``
selects the SM80-MMA kernel); backward native for 64/128 (the Hopper WGMMA/TMA kernel on sm90,
``GR_KERNELS_BWD_KERNEL=sm80`` selects the SM80-MMA kernel) and, in builds with sm90a code, for 256 (only the Hopper
backward exists there). dq
accumulates in an fp32 buffer, cast once at the end; drab is written 16-bit by the Hopper backward (TMA stores and
reduce-adds of its dX tiles, every element written: no zeroing) and accumulated in fp32 by the SM80-MMA one
(``_drab_buffers``). A head-dim-256 backward without
the sm90a build, or with delta q, runs the PyTorch reference (``reference_backward``).

Delta q (``q_offsets``: queries are the last tokens of each sequence) is in all three native kernels (SM80-MMA
forward and backward, Hopper forward) and passed the GPU parity suite on an H200 (tests/gr_kernels/test_delta_q.py's
native tests: every mask family, rab on/off, ragged q and kv lengths including 0, hypothesis shapes), so delta-q
calls take the native path like full ones. ``GR_KERNELS_NATIVE_DELTA_Q=0`` (read per call) sends them to the
reference instead, e.g. to bisect a numerical difference.

Split KV (``gr_kernels.split_kv``): a forward whose grid is small (delta q against a long cached history) can divide
each CTA's key tiles among several CTAs that write fp32 partials into a torch-allocated workspace, summed by a reduce
kernel; ``GR_KERNELS_FWD_SPLITS`` forces a count (1 = off); unset, the heuristic decides (verified on an H200).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from gr_kernels.backends import _log_skip_once
from gr_kernels.params import AttentionCall, HSTUParams
from gr_kernels.reference import reference_backward
from gr_kernels.split_kv import fwd_splits

try:
    from gr_kernels import _C  # type: ignore[attr-defined]
except ImportError as e:  # a pure-Python install: no nvcc at build time, or GR_KERNELS_CUDA=off
    _C = None
    _IMPORT_ERROR = str(e)
else:
    _IMPORT_ERROR = ""

HEAD_DIMS = (64, 128, 256)
BWD_HEAD_DIMS = (64, 128)  # the SM80-MMA backward (every build)
SM90_BWD_HEAD_DIMS = (64, 128, 256)  # the Hopper backward (builds with sm90a code; no delta q)
_DTYPES = {torch.bfloat16: 0, torch.float16: 1}
NATIVE_DELTA_Q_ENV = "GR_KERNELS_NATIVE_DELTA_Q"


def native_delta_q_enabled() -> bool:
    """Whether delta-q calls may use the native kernels: yes unless ``GR_KERNELS_NATIVE_DELTA_Q=0`` (read per call)."""
    return os.environ.get(NATIVE_DELTA_Q_ENV, "") != "0"


def native_backward_head_dims(delta_q: bool = False) -> tuple[int, ...]:
    """Head dims whose backward runs natively in this build (the callers of ``backward`` are on an sm90 GPU)."""
    if _C is not None and not delta_q and "90a" in _C.compiled_archs().split(";"):
        return SM90_BWD_HEAD_DIMS
    return BWD_HEAD_DIMS


def native_available() -> bool:
    """True when this install holds the compiled CUDA kernels."""
    return _C is not None


def _row_aligned(t: Tensor) -> bool:
    # ldmatrix/cp.async move 16-byte chunks: the last dim must be contiguous and rows/heads 16-byte aligned.
    elems = 16 // t.element_size()
    return t.stride(-1) == 1 and t.stride(0) % elems == 0 and t.stride(1) % elems == 0 and t.data_ptr() % 16 == 0


class CutlassBackend:
    """``hstu_attention`` on Hopper (sm90) through the compiled kernels; see the module docstring."""

    priority = 100

    def supports(self, call: AttentionCall) -> str | None:
        if call.delta_q and not native_delta_q_enabled():  # checked first: the same answer on every machine
            return f"delta q (q_offsets) sent to the reference by {NATIVE_DELTA_Q_ENV}=0"
        if _C is None:
            return f"gr-kernels was installed without its CUDA kernels ({_IMPORT_ERROR or 'no nvcc at build time'})"
        if call.device.type != "cuda":
            return f"inputs are on {call.device.type}, not CUDA"
        major, minor = torch.cuda.get_device_capability(call.device)
        if (major, minor) != (9, 0):
            return f"the kernels are built for sm90 (Hopper); this GPU is sm{major}{minor}"
        if call.dtype not in _DTYPES:
            return f"dtype {call.dtype} is not bfloat16 or float16"
        if call.attention_dim != call.hidden_dim or call.attention_dim not in HEAD_DIMS:
            return (
                f"head dims q/k {call.attention_dim}, v {call.hidden_dim}: the kernels need equal dims in {HEAD_DIMS}"
            )
        if call.params.dropout_p > 0.0:
            return "attention dropout is not implemented in the native kernels"
        return None

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        seq_offsets: Tensor,
        num_targets: Tensor | None,
        rab: Tensor | None,
        params: HSTUParams,
        q_offsets: Tensor | None = None,
    ) -> Tensor:
        q, k, v = (_aligned(t) for t in (q, k, v))
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # total_q rows with delta q
        args, _ = _common_args(q, k, v, seq_offsets, num_targets, rab, params, q_offsets)
        # Split KV (gr_kernels.split_kv): small grids share each CTA's key tiles among `splits` CTAs whose fp32
        # partials land in this workspace; the extension sums them into out.
        grid_rows = params.max_seq_len if q_offsets is None else params.max_q_len
        splits = fwd_splits(seq_offsets.numel() - 1, q.shape[1], grid_rows, params.max_seq_len, q.shape[2], q.device)
        if out.numel() == 0:
            splits = 1  # nothing to split (and an empty workspace has no address)
        accum = torch.empty((splits, *out.shape), dtype=torch.float32, device=q.device) if splits > 1 else None
        _C.hstu_fwd(
            out.data_ptr(),
            (out.stride(0), out.stride(1)),
            _stream(q),
            *args,
            0 if accum is None else accum.data_ptr(),
            splits,
        )
        return out

    def backward(
        self,
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
        native_dims = native_backward_head_dims(q_offsets is not None)
        if q.shape[-1] not in native_dims:
            # The forward ran natively; say once (the registry's skip log) that this backward does not.
            _log_skip_once(
                "cutlass",
                f"no native backward for head dim {q.shape[-1]}{' with delta q' if q_offsets is not None else ''} "
                f"(native: {', '.join(map(str, native_dims))}); that backward runs the PyTorch reference",
            )
            return reference_backward(grad_out, q, k, v, seq_offsets, num_targets, rab, params, q_offsets, need_drab)
        q, k, v, grad_out = (_aligned(t) for t in (q, k, v, grad_out))
        # A frozen bias (need_drab False) is still read; the kernels skip drab when given no buffer for it.
        drab_accum, drab = _drab_buffers(rab if need_drab else None, q, q_offsets is not None)
        # The Hopper kernel orders the heads that share a drab plane through zeroed words (owner counters and per-tile
        # flags); they ride behind dq's fp32 accumulator, which is zeroed anyway (one memset for both).
        sync_words = 0
        if drab is not None:
            sync_words = _C.hstu_bwd_drab_sync_words(drab.shape[0], q.shape[1], drab.shape[1], drab.shape[2])
        # dq (and grad_out) have q's rows, total_q with delta q; dk and dv every key row (zero where no query looks).
        dq_and_sync = torch.zeros(q.numel() + sync_words, dtype=torch.float32, device=q.device)
        dq = dq_and_sync[: q.numel()].view(q.shape)
        dk = torch.empty(k.shape, dtype=q.dtype, device=q.device)
        dv = torch.empty(v.shape, dtype=q.dtype, device=q.device)
        args, _ = _common_args(q, k, v, seq_offsets, num_targets, rab, params, q_offsets)
        _C.hstu_bwd(
            grad_out.data_ptr(),
            (grad_out.stride(0), grad_out.stride(1)),
            dq.data_ptr(),
            dk.data_ptr(),
            dv.data_ptr(),
            0 if drab_accum is None else drab_accum.data_ptr(),
            0 if drab is None else drab.data_ptr(),
            0 if drab is None else drab.stride(2),
            dq_and_sync[q.numel() :].data_ptr() if sync_words else 0,
            _stream(q),
            *args,
        )
        if rab is None or not need_drab:
            return dq.to(q.dtype), dk, dv, None
        grad_rab = drab_accum if drab is None else drab[..., : rab.shape[-1]].contiguous()  # a copy only if padded
        return dq.to(q.dtype), dk, dv, grad_rab.to(rab.dtype)


def _drab_buffers(rab: Tensor | None, q: Tensor, delta_q: bool) -> tuple[Tensor | None, Tensor | None]:
    """The drab buffer of the kernel that ``_C.hstu_bwd`` will run, as (fp32 accumulator, 16-bit rows).

    The SM80-MMA backward adds fp32 atomics into [B, H_rab, N, N], zeroed here; the Hopper one writes 16-bit dX tiles
    (q's dtype) through TMA stores and reduce-adds and zeroes what no tile covers, so its buffer is left unset. TMA
    wants 16-byte rows: its [B, H_rab, N, N_pad] rows are padded to a multiple of 8 elements (the caller slices the
    padding, which the kernel does not write, off).
    """
    if rab is None:
        return None, None
    # The kernels get an aligned bias (_kernel_bias), so its rows are 16-byte aligned iff they hold a multiple of 8.
    if not _C.hstu_bwd_runs_sm90(q.shape[-1], delta_q, rab.shape[-1] % 8 == 0):
        return torch.zeros(rab.shape, dtype=torch.float32, device=q.device), None
    n = rab.shape[-1]
    padded = (*rab.shape[:-1], -(-n // 8) * 8)
    return None, torch.empty(padded, dtype=q.dtype, device=q.device)


def _kernel_bias(rab: Tensor, dtype: torch.dtype) -> Tensor:
    """``rab`` as the kernels read it: in ``dtype``, contiguous, from a 16-byte aligned address (bias pairs are read as
    32-bit words, and the Hopper backward of head dims 64 and 128 loads bias rows through TMA); a copy only where
    ``rab`` is not already that (e.g. a view starting inside its storage)."""
    bias = rab.to(dtype).contiguous()
    return bias if bias.data_ptr() % 16 == 0 else bias.clone()


def _aligned(t: Tensor) -> Tensor:
    return t if _row_aligned(t) else t.contiguous()


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _common_args(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    num_targets: Tensor | None,
    rab: Tensor | None,
    params: HSTUParams,
    q_offsets: Tensor | None = None,
) -> tuple[tuple, list[Tensor]]:
    """The positional arguments both kernels share, and the temporaries they point into (kept alive by the caller's
    stream order: torch's allocator does not reuse a block before the stream's queued work is done)."""
    if q_offsets is not None and params.max_q_len < 1:
        raise ValueError(f"delta q (q_offsets) needs params.max_q_len >= 1, got {params.max_q_len}")
    offsets = seq_offsets.to(torch.int32).contiguous()
    q_offs = None if q_offsets is None else q_offsets.to(torch.int32).contiguous()
    targets = None if num_targets is None else num_targets.to(torch.int32).contiguous()
    bias = None if rab is None else _kernel_bias(rab, q.dtype)
    args = (
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        (q.stride(0), q.stride(1)),
        (k.stride(0), k.stride(1)),
        (v.stride(0), v.stride(1)),
        offsets.data_ptr(),
        0 if targets is None else targets.data_ptr(),
        0 if bias is None else bias.data_ptr(),
        0 if bias is None else bias.shape[1],
        offsets.numel() - 1,
        q.shape[1],
        q.shape[2],
        params.max_seq_len,
        params.alpha,
        params.scaling_seqlen,
        params.causal,
        params.max_attn_len,
        params.contextual_seq_len,
        params.target_group_size,
        _DTYPES[q.dtype],
        k.shape[0],
        0 if q_offs is None else q_offs.data_ptr(),
        0 if q_offs is None else params.max_q_len,
        q.shape[0],
    )
    return args, [t for t in (offsets, targets, bias, q_offs) if t is not None]
