"""Skip marks of gr-models' Triton-kernel tests. Importing this module imports Triton (when installed) in compiled
mode before any test loads a kernels module's interpreted copy: Triton's standard-library helpers are created in
whichever mode Triton was first imported (test_gathered_logits_triton says more)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    import triton  # noqa: F401

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs triton and CUDA")
