"""Portable Triton backend of ``hstu_attention`` (registered as ``"triton"``; see ``backend.py``).

``kernels.py`` holds the Triton kernels, ``configs.py`` their tile configurations (a short autotuned list),
``launch.py`` the launchers. Nothing here imports Triton until a kernel is launched.
"""

from gr_kernels.triton_backend.backend import TritonBackend, interpreter_requested, triton_available

__all__ = ["TritonBackend", "interpreter_requested", "triton_available"]
