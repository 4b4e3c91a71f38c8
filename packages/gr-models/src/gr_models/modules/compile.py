"""Compiled dense parts of HSTU blocks (``torch.compile`` / Inductor) around the eager attention op.

What is compiled: each block's ``project`` (LayerNorm -> Linear -> SiLU -> split into U, V, Q, K) and ``finish``
(``U * LayerNorm(attn)`` -> Linear -> dropout -> residual), forward and backward (AOTAutograd). Inductor fuses the
LayerNorms, autocast casts, SiLU, split and residual into a few kernels around the two GEMMs, which eager runs as
one kernel (or more) per op.

What is not: the attention op between them stays an eager call of ``gr_kernels.hstu_attention``, so that

- its ``validate=True`` value checks (block 0 of ``HSTUEncoder``: offsets and lengths read on the host, one
  device-to-host copy) still run on every forward; inside a compiled graph the op skips them;
- its attention-dropout seed (a Python int drawn from the CPU generator, a graph break under compile) and its
  backend choice (logged once, eagerly) behave exactly as without compilation;
- ``max_seq_len`` (a Python int that changes with every jagged batch) never reaches a compiled region: the compiled
  graphs see only ``[tokens, ...]`` tensors, and the token dim is marked dynamic (``dynamic=True``), so one graph
  per function serves every batch (a token count of 1 is specialised by torch, one more graph).

The op is opaque to Inductor either way, so compiling the whole block would fuse nothing more; it would save one
compiled-call overhead per block and lose the points above.

The compiled functions are the classes' own ``project``/``finish`` compiled once per (function, options) and shared
by every block (Dynamo lifts the parameters to graph inputs, so the eight blocks of an encoder share one graph);
each block gets instance attributes that call them with itself. Parameter names, state dicts, hooks and
``isinstance`` checks are unchanged; ``copy.deepcopy`` of a compiled model gives a compiled copy using its own
weights. Inference paths (``forward_with_past``, ``forward_into_keys``) go through the same compiled functions.
Tensor-parallel blocks (gr-parallel) are not compiled: their projections run Megatron's collectives.

Measured (1 x H200, ``tools/bench_parallel.py --configs 1x1``, 8 blocks of dim 512): the 8 blocks alone run
fwd+bwd in 41.1 ms instead of 50.1 ms eager, but the full training step got SLOWER (154 ms vs 84 ms eager, no
recompiles in the timed steps; host time per step rose). Compiling each block's whole forward instead (the attention
op inside, its offsets check then skipped) measured 72.0 ms per step; that form is not offered here yet.

Dropout in ``finish`` (``HSTUConfig.dropout > 0``) draws its masks from Inductor's RNG inside the compiled graph:
same distribution and still seeded by ``torch.manual_seed``, but not the masks eager draws.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gr_models.modules.hstu import HSTUBlock, HSTUEncoder

_METHODS = ("project", "finish")
# Inductor modes whose graphs replay without CUDA graphs. "reduce-overhead" and "max-autotune" record a CUDA graph
# per distinct input shape, i.e. per jagged batch's token count: memory and recording time grow without bound.
COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")

_compiled: dict[tuple[Any, ...], Callable[..., Any]] = {}


def _compiled_function(fn: Callable[..., Any], dynamic: bool, mode: str | None, backend: str) -> Callable[..., Any]:
    key = (fn, dynamic, mode, backend)
    if key not in _compiled:
        # dynamic=None (not True) with the token dim marked in _CompiledMethod: only the token dim is symbolic; head
        # counts and widths stay constants, so equal sizes cannot merge into one symbol (duck sizing) and recompile.
        _compiled[key] = torch.compile(fn, dynamic=None if dynamic else False, mode=mode, backend=backend)
    return _compiled[key]


class _CompiledMethod:
    """A block's ``project`` or ``finish``, running the compiled function of its class with the block itself.

    Holds the block (not a bound method or closure), so ``copy.deepcopy`` of a model maps it to the copied block."""

    def __init__(self, block: nn.Module, name: str, dynamic: bool, mode: str | None, backend: str) -> None:
        self.block, self.name = block, name
        self.dynamic, self.mode, self.backend = dynamic, mode, backend
        self.fn = _compiled_function(getattr(type(block), name), dynamic, mode, backend)

    def __call__(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        if self.dynamic:
            for t in (*args, *kwargs.values()):  # x [n, D], u [n, H * Dv], attn [n, H, Dv]: n changes every batch
                if isinstance(t, torch.Tensor) and t.dim() > 0:
                    torch._dynamo.maybe_mark_dynamic(t, 0)
        return self.fn(self.block, *args, **kwargs)

    # Pickling (e.g. torch.save of a whole model) stores the options, not the compiled function; loading compiles anew.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "fn"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.fn = _compiled_function(getattr(type(self.block), self.name), self.dynamic, self.mode, self.backend)

    def __repr__(self) -> str:
        return f"compiled {type(self.block).__name__}.{self.name} (dynamic={self.dynamic}, mode={self.mode!r})"


def hstu_blocks(module: nn.Module) -> list[nn.Module]:
    """Every block of every ``HSTUEncoder`` inside ``module`` (``module`` itself may be the encoder)."""
    return [block for enc in module.modules() if isinstance(enc, HSTUEncoder) for block in enc.blocks]


def compile_hstu_blocks(
    module: nn.Module,
    *,
    dynamic: bool = True,
    mode: str | None = None,
    backend: str = "inductor",
) -> nn.Module:
    """Compiles the dense parts (``project``, ``finish``) of every HSTU block in ``module`` (an ``HSTUEncoder`` or a
    model holding one or more) in place; returns ``module``. See the module doc for what is compiled and why.

    Args:
        dynamic: True: the token dim is dynamic from the first call, so jagged batches of any size reuse one graph.
            False: static shapes (one graph per token count, up to torch's recompile limit; only for fixed-size
            batches).
        mode: an Inductor mode without CUDA graphs: None / "default" or "max-autotune-no-cudagraphs".
        backend: the ``torch.compile`` backend ("inductor"; e.g. "aot_eager" to debug).

    Applying it again replaces the earlier options; ``uncompile_hstu_blocks`` restores the eager methods. Compiles
    lazily: the first forward (and backward) of each kind (training / no-grad, autocast dtype) pays the compile time.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``, a block is not a gr-models ``HSTUBlock`` (e.g. gr-parallel's
            tensor-parallel block), or ``dynamic`` is not a bool.
        ValueError: ``module`` holds no HSTU encoder, or ``mode`` is not one of ``COMPILE_MODES``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"compile_hstu_blocks needs an nn.Module (an HSTUEncoder or a model), got {type(module)}")
    if not isinstance(dynamic, bool):
        raise TypeError(f"dynamic must be a bool, got {dynamic!r}")
    if mode not in COMPILE_MODES:
        raise ValueError(
            f"mode must be one of {COMPILE_MODES}, got {mode!r}: modes with CUDA graphs record one graph per jagged "
            "batch size"
        )
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a torch.compile backend name, got {backend!r}")
    blocks = hstu_blocks(module)
    if not blocks:
        raise ValueError(f"no HSTUEncoder (with blocks) inside {type(module).__name__}: nothing to compile")
    for i, block in enumerate(blocks):
        if not isinstance(block, HSTUBlock):
            raise TypeError(
                f"HSTU block {i} is a {type(block).__name__}, not a gr_models HSTUBlock: only single-device blocks "
                "are compiled (tensor-parallel blocks run Megatron collectives inside their projections)"
            )
    for block in blocks:
        for name in _METHODS:
            setattr(block, name, _CompiledMethod(block, name, dynamic, mode, backend))
    return module


def uncompile_hstu_blocks(module: nn.Module) -> nn.Module:
    """Undoes ``compile_hstu_blocks``: every HSTU block in ``module`` runs its eager ``project``/``finish`` again."""
    for block in hstu_blocks(module):
        for name in _METHODS:
            if isinstance(block.__dict__.get(name), _CompiledMethod):
                delattr(block, name)
    return module


def is_compiled(block: nn.Module) -> bool:
    """Whether ``compile_hstu_blocks`` compiled ``block``'s dense parts."""
    return all(isinstance(block.__dict__.get(name), _CompiledMethod) for name in _METHODS)


__all__ = ["COMPILE_MODES", "compile_hstu_blocks", "hstu_blocks", "is_compiled", "uncompile_hstu_blocks"]
