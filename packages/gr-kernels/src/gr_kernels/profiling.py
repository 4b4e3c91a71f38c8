"""``op_range(name)``: the profiler range the eager op paths (gr-kernels' attention, gr-models' fused ops) put around
their bodies, under the custom ops' names, so traces read the same as for the ops themselves.

``torch.profiler.record_function`` enters and exits through the dispatcher even when nothing is profiling (19.8 us
of host time per call on a loaded 2-core CPU machine, gr-kernels README; ~70 calls per training step of an 8-block
HSTU model, half of them in a host-bound forward), so the range is opened only while a profiler records. Autograd's
worker threads inherit the profiler state of the thread that started the backward, so backward ranges appear too.
"""

from __future__ import annotations

import contextlib

import torch


def op_range(name: str) -> contextlib.AbstractContextManager:
    """``record_function(name)`` while a profiler records, else a no-op context."""
    if torch._C._autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()
