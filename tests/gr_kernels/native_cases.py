"""What the native-kernel parity tests share (test_cutlass_backend.py, test_delta_q.py): the sm90 skip, the mask
families, and the error floor of the parity rule."""

from __future__ import annotations

import pytest
import torch

from gr_kernels.cutlass_backend import native_available

ON_SM90 = torch.cuda.is_available() and native_available() and torch.cuda.get_device_capability(0) == (9, 0)
needs_sm90 = pytest.mark.skipif(not ON_SM90, reason="needs an sm90 GPU and gr-kernels built with its CUDA kernels")

# Every mask family the kernels implement (num_targets: per-sequence count, clamped below each length).
MASK_FAMILIES: dict[str, dict[str, object]] = {
    "causal": {},
    "full": {"causal": False},
    "window": {"max_attn_len": 37},
    "window_full": {"causal": False, "max_attn_len": 50},
    "context": {"contextual_seq_len": 5},
    "targets": {"num_targets": 7},
    "targets_groups": {"num_targets": 9, "target_group_size": 3},
    "context_targets_window": {"contextual_seq_len": 3, "num_targets": 6, "max_attn_len": 40},
}


def rounding_floor(exact: torch.Tensor, dtype: torch.dtype) -> float:
    """One unit in the last place of ``dtype`` at the largest magnitude of ``exact`` (and at least 1e-5): the final
    fp32 -> bf16/fp16 store alone may cost that."""
    return max(torch.finfo(dtype).eps * exact.abs().max().item(), 1e-5)
