"""The ``"triton"`` backend of ``hstu_attention``: portable Triton kernels for any CUDA GPU Triton supports.

Priority 50: ``backend="auto"`` takes it after ``"cutlass"`` (the Hopper-native kernels, 100) and before the
PyTorch reference (0), so it runs where the native build is missing or the GPU is not sm90 (A100, L40, consumer
GPUs). Same features as the reference except dropout: jagged sequences, every mask (causal, local window,
contextual prefix, targets with groups), delta q (``q_offsets``), ``rab`` shared or per head with its gradient,
``alpha`` and ``scaling_seqlen``; bf16/fp16 (fp16 from sm75, bf16 from sm80) and fp32 (IEEE products; ``auto``
leaves fp32 on CUDA to the faster reference, ``backend="triton"`` runs it); head dims up to 256 (q/k and v may
differ; dims that are not powers of two are padded inside the kernel).

CPU tensors run only when the Triton interpreter is requested (``TRITON_INTERPRET=1``), in float32 or float16 (the
interpreter computes on NumPy, which has no bfloat16): slow, for tests and debugging (``launch.py`` runs an
interpreted copy of the kernels, whatever the process-wide setting was at import). Triton itself is imported on
the first call, so ``import gr_kernels`` works and stays fast without it.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from gr_kernels.params import AttentionCall, HSTUParams

MAX_HEAD_DIM = 256
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TRITON_FOUND = importlib.util.find_spec("triton") is not None
_INT32_MAX = 2**31 - 1


def triton_available() -> bool:
    """True when the ``triton`` package is installed (it is imported lazily, on the first kernel launch)."""
    return _TRITON_FOUND


def interpreter_requested() -> bool:
    """``TRITON_INTERPRET`` set to a true value: then CPU tensors run the kernels in Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


class TritonBackend:
    """``hstu_attention`` through the Triton kernels (see the module docstring); supports delta q."""

    priority = 50

    def supports(self, call: AttentionCall) -> str | None:
        if not _TRITON_FOUND:
            return "the triton package is not installed (pip install triton)"
        if call.device.type != "cuda" and not (call.device.type == "cpu" and interpreter_requested()):
            return f"inputs are on {call.device.type}, not CUDA (CPU runs only under TRITON_INTERPRET=1)"
        if call.dtype not in _DTYPES:
            return f"dtype {call.dtype} is not bfloat16, float16 or float32"
        if call.device.type != "cuda" and call.dtype == torch.bfloat16:
            return "the Triton interpreter computes bfloat16 wrongly (NumPy has no bfloat16): use float32 or float16"
        if max(call.attention_dim, call.hidden_dim) > MAX_HEAD_DIM:
            return f"head dims q/k {call.attention_dim}, v {call.hidden_dim}: the kernels take at most {MAX_HEAD_DIM}"
        if call.params.dropout_p > 0.0:
            return "attention dropout is not implemented in the Triton kernels"
        n = call.params.max_seq_len
        if max(n * call.num_heads * max(call.attention_dim, call.hidden_dim), n * n) > _INT32_MAX:
            return f"max_seq_len {n} is too long for the kernels' 32-bit offsets within one sequence"
        if call.device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(call.device)
            if (major, minor) < (7, 5) or (call.dtype == torch.bfloat16 and major < 8):
                return (
                    f"{call.dtype} Triton kernels need sm{'80' if major >= 7 else '75'}+, this GPU is sm{major}{minor}"
                )
        return None

    def auto_skip(self, call: AttentionCall) -> str | None:
        # The tile lists (configs.py) were sized for 16-bit operands; fp32 tiles with IEEE products run far slower
        # than the reference's cuBLAS matmuls (H200, tools/bench_inference.py, history 4096 + 256 candidates, fp32
        # full forward: 301 ms through these kernels, 31 ms through the reference). backend="triton" still runs it.
        if call.device.type == "cuda" and call.dtype == torch.float32:
            return "float32 on CUDA: the reference's cuBLAS matmuls are faster than these kernels' IEEE fp32 tiles"
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
        from gr_kernels.triton_backend import launch

        return launch.forward(q, k, v, seq_offsets, num_targets, rab, params, q_offsets)

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
        from gr_kernels.triton_backend import launch

        return launch.backward(grad_out, q, k, v, seq_offsets, num_targets, rab, params, q_offsets, need_drab)
