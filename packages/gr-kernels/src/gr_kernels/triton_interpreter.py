"""A second copy of a module of ``@triton.jit`` kernels, loaded with Triton's interpreter on (CPU tensors, tests).

``@triton.jit`` reads the interpreter switch when a kernel is defined, so the module is imported again under its own
name with the switch on for the duration of the import only: the process-wide ``TRITON_INTERPRET`` setting, and the
compiled copy that CUDA tensors use, stay as they were. ``KernelModules`` pairs the two copies of one kernels module;
shared by gr-kernels' attention kernels and gr-models' ``gathered_logits`` and ``norm_mul`` kernels. Triton is
imported on the first call only.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

import torch


class KernelModules:
    """The kernels module ``module`` (a dotted name) as imported (compiled kernels, CUDA tensors) and as its copy
    ``interpreted_name`` loaded with the interpreter on (CPU tensors), each loaded on first use."""

    def __init__(self, module: str, interpreted_name: str) -> None:
        self.module = module
        self.interpreted_name = interpreted_name

    def compiled(self) -> ModuleType:
        return importlib.import_module(self.module)

    def interpreted(self) -> ModuleType:
        loaded = sys.modules.get(self.interpreted_name)
        if loaded is None:
            spec = importlib.util.find_spec(self.module)
            assert spec is not None and spec.origin is not None, self.module
            loaded = load_interpreted(spec.origin, self.interpreted_name)
        return loaded

    def for_device(self, device: torch.device) -> ModuleType:
        return self.compiled() if device.type == "cuda" else self.interpreted()


def load_interpreted(path: str, name: str) -> ModuleType:
    """The kernels module at ``path`` imported as ``name`` with the Triton interpreter on (registered in
    ``sys.modules``; callers cache it)."""
    from triton import knobs

    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with knobs.runtime.scope():  # restores the knob and TRITON_INTERPRET on exit
        knobs.runtime.interpret = True
        spec.loader.exec_module(module)
    # The interpreter runs the kernels' Python with this module's globals: shadow range() there (see below).
    module.range = _interpreter_range
    sys.modules[name] = module
    return module


def _interpreter_range(*bounds: object) -> range:
    """``range`` over interpreter scalars: they are 1-element arrays, whose ``int()`` NumPy >= 2.3 refuses (Triton
    3.6's interpreter converts loop bounds with ``int(array)``)."""
    return range(*(_scalar(b) for b in bounds))


def _scalar(x: object) -> int:
    data = getattr(getattr(x, "handle", None), "data", None)
    return int(data.reshape(-1)[0]) if data is not None else int(x)  # type: ignore[call-overload]
