"""Host-to-device copies that never make the host wait for the device."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (a host tensor) on ``device``, without a sync: on CUDA through pinned memory (from pageable memory the
    driver may wait for the stream before staging; torch's pinned-memory cache keeps the buffer alive until the copy
    is done), elsewhere a non-blocking ``to``. On the CPU it is ``t`` itself."""
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
