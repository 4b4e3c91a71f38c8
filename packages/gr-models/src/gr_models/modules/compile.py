"""Compiled HSTU blocks (``torch.compile`` / Inductor), in one of two scopes.

``scope="block"`` (recommended): each block's whole ``forward`` is one compiled graph, forward and backward
(AOTAutograd): LayerNorm -> Linear -> SiLU -> split, the attention op, ``U * LayerNorm(attn)`` -> Linear -> dropout ->
residual. The attention op (``gr_kernels.hstu_attention``) is a ``torch.library`` custom op with a fake impl, so it
sits in the graph as one opaque node (Inductor calls the same kernels as eager); what the whole-block graph saves over
``"projections"`` is the eager glue between the pieces: one compiled call per block instead of two plus an eager op
call, and no Python in between. Per-step host work that would break or slow a graph is kept out of it:

- the op's value checks of the offsets (``validate=True``: offsets from 0 to the token count, non-decreasing,
  lengths <= ``max_seq_len``, ``0 <= num_targets <= length``; one device-to-host copy) cannot run inside a graph (the
  op skips them while compiling). The compiled block runs them eagerly, before its graph, whenever it is called with
  ``validate=True`` (in ``HSTUEncoder`` block 0 on every forward), then runs the graph with the check off: bad
  offsets still raise the op's own ``ValueError`` once per step;
- ``max_seq_len`` (a Python int that changes with every jagged batch) becomes a symbolic int: Dynamo compiles the
  first batch with it as a constant and, on the first batch with another value, once more with it symbolic
  (automatic dynamic shapes); the token and batch dims (``x``, ``seq_offsets``, ``num_targets``, ``rab``) are marked
  dynamic from the first call. From then on one graph serves every block and every batch. Torch specialises a size
  of 0 or 1 (a batch of 1 token in total; ``max_seq_len`` 1, i.e. all sequences of length <= 1 without a relative
  bias; a single sequence with one): one more graph each;
- the relative attention bias is computed by the encoder before the blocks (eager, once per forward, shared by all
  blocks) and enters each block's graph as a tensor input; its gradient flows back through the op;
- attention dropout (``HSTUConfig.attn_dropout > 0`` in training) draws its seed as a Python int from the CPU
  generator: a graph break, so the block then runs as two graphs around that draw (still correct, masks as eager);
- the attention backend is resolved while tracing (``"auto"`` picks the same backend as eager for the traced
  dtype/device) and recorded in the graph.

Inference paths (``forward_with_past``, ``forward_into_keys``) stay eager with ``scope="block"``.

``scope="projections"``: only ``project`` (LayerNorm -> Linear -> SiLU -> split into U, V, Q, K) and ``finish``
(``U * LayerNorm(attn)`` -> Linear -> dropout -> residual) are compiled; the attention op between them runs eagerly,
so its value checks, dropout seed and backend choice behave exactly as without compilation, and ``max_seq_len``
never reaches a compiled region. The inference paths go through the compiled pieces too.

Either way the compiled functions are the class's own methods compiled once per (method, options) and shared by
every block (Dynamo lifts the parameters to graph inputs, so the eight blocks of an encoder share one graph); each
block gets instance attributes that call them with itself. Parameter names, state dicts, hooks and ``isinstance``
checks are unchanged; ``copy.deepcopy`` of a compiled model gives a compiled copy using its own weights.
Tensor-parallel blocks (gr-parallel) are not compiled: their projections run Megatron's collectives.

Measured (1 x H200, ``tools/bench_parallel.py --configs 1x1``, 8 blocks of dim 512): ``"projections"`` ran the 8
blocks alone fwd+bwd in 41.1 ms instead of 50.1 ms eager, but the full training step got SLOWER (154 ms vs 84 ms
eager, no recompiles in the timed steps; host time per step rose). The whole-block form, as a patch in a GPU
script (the offsets check then skipped instead of run eagerly), measured 72.0 ms per step (122.1 TFLOP/s).

Dropout in ``finish`` (``HSTUConfig.dropout > 0``) draws its masks from Inductor's RNG inside the compiled graph:
same distribution and still seeded by ``torch.manual_seed``, but not the masks eager draws.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# The op's own value checks (same errors as the eager op): run before a compiled block's graph, which cannot read
# tensor values.
from gr_kernels import check_attention_values
from gr_models.modules.hstu import HSTUBlock, HSTUEncoder

# What each scope compiles: the block methods replaced by compiled ones.
SCOPES: dict[str, tuple[str, ...]] = {"block": ("forward",), "projections": ("project", "finish")}
_ALL_METHODS = tuple(name for names in SCOPES.values() for name in names)
# Inductor modes whose graphs replay without CUDA graphs. "reduce-overhead" and "max-autotune" record a CUDA graph
# per distinct input shape, i.e. per jagged batch's token count: memory and recording time grow without bound.
COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")

_compiled: dict[tuple[Any, ...], Callable[..., Any]] = {}


def _compiled_function(fn: Callable[..., Any], dynamic: bool, mode: str | None, backend: str) -> Callable[..., Any]:
    key = (fn, dynamic, mode, backend)
    if key not in _compiled:
        # dynamic=None (not True) with the jagged dims marked in the callers: only those dims (and ints that change,
        # e.g. max_seq_len) become symbolic; head counts and widths stay constants, so equal sizes cannot merge into
        # one symbol (duck sizing) and recompile.
        _compiled[key] = torch.compile(fn, dynamic=None if dynamic else False, mode=mode, backend=backend)
    return _compiled[key]


def _mark_dynamic(t: Any, *dims: int) -> None:
    if isinstance(t, torch.Tensor):
        for d in dims:
            if d < t.dim():
                torch._dynamo.maybe_mark_dynamic(t, d)


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
                _mark_dynamic(t, 0)
        return self.fn(self.block, *args, **kwargs)

    # Pickling (e.g. torch.save of a whole model) stores the options, not the compiled function; loading compiles anew.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "fn"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.fn = _compiled_function(getattr(type(self.block), self.name), self.dynamic, self.mode, self.backend)

    def __repr__(self) -> str:
        return f"compiled {type(self.block).__name__}.{self.name} (dynamic={self.dynamic}, mode={self.mode!r})"


class _CompiledForward(_CompiledMethod):
    """A block's whole ``forward`` compiled: the value checks run eagerly first, the graph with them off."""

    def __call__(  # type: ignore[override]
        self,
        x: torch.Tensor,
        seq_offsets: torch.Tensor,
        max_seq_len: int,
        rab: torch.Tensor | None,
        *,
        num_targets: torch.Tensor | None = None,
        contextual_seq_len: int = 0,
        validate: bool = True,
    ) -> torch.Tensor:
        # Tensors of the wrong type or rank are left to the op's structure checks (traced; they raise the same).
        if validate and all(isinstance(t, torch.Tensor) for t in (x, seq_offsets)) and seq_offsets.dim() == 1:
            check_attention_values(x, x, seq_offsets, max_seq_len, num_targets, None, 0)
        if self.dynamic:
            _mark_dynamic(x, 0)  # [n, D]: tokens
            _mark_dynamic(seq_offsets, 0)  # [B + 1]
            _mark_dynamic(num_targets, 0)  # [B]
            _mark_dynamic(rab, 0, 2, 3)  # [B, 1 or H, max_seq_len, max_seq_len]
        return self.fn(
            self.block,
            x,
            seq_offsets,
            max_seq_len,
            rab,
            num_targets=num_targets,
            contextual_seq_len=contextual_seq_len,
            validate=False,
        )


def hstu_blocks(module: nn.Module) -> list[nn.Module]:
    """Every block of every ``HSTUEncoder`` inside ``module`` (``module`` itself may be the encoder)."""
    return [block for enc in module.modules() if isinstance(enc, HSTUEncoder) for block in enc.blocks]


def compile_hstu_blocks(
    module: nn.Module,
    *,
    scope: str = "block",
    dynamic: bool = True,
    mode: str | None = None,
    backend: str = "inductor",
) -> nn.Module:
    """Compiles every HSTU block in ``module`` (an ``HSTUEncoder`` or a model holding one or more) in place; returns
    ``module``. See the module doc for what each scope compiles and why.

    Args:
        scope: "block" (each block's whole forward, attention op included; value checks run eagerly before the
            graph) or "projections" (only ``project``/``finish``, the attention op eager between them).
        dynamic: True: the jagged dims are dynamic from the first call (``max_seq_len`` from the first change), so
            jagged batches of any size reuse one graph. False: static shapes (one graph per token count and
            ``max_seq_len``, up to torch's recompile limit; only for fixed-size batches).
        mode: an Inductor mode without CUDA graphs: None / "default" or "max-autotune-no-cudagraphs".
        backend: the ``torch.compile`` backend ("inductor"; e.g. "aot_eager" to debug).

    Applying it again replaces the earlier scope and options; ``uncompile_hstu_blocks`` restores the eager methods.
    Compiles lazily: the first forward (and backward) of each kind (training / no-grad, autocast dtype) pays the
    compile time.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``, a block is not a gr-models ``HSTUBlock`` (e.g. gr-parallel's
            tensor-parallel block), or ``dynamic`` is not a bool.
        ValueError: ``module`` holds no HSTU encoder, ``scope`` is not one of ``SCOPES`` or ``mode`` is not one of
            ``COMPILE_MODES``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"compile_hstu_blocks needs an nn.Module (an HSTUEncoder or a model), got {type(module)}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {tuple(SCOPES)}, got {scope!r}")
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
    uncompile_hstu_blocks(module)
    for block in blocks:
        for name in SCOPES[scope]:
            wrapper = _CompiledForward if name == "forward" else _CompiledMethod
            setattr(block, name, wrapper(block, name, dynamic, mode, backend))
    return module


def uncompile_hstu_blocks(module: nn.Module) -> nn.Module:
    """Undoes ``compile_hstu_blocks``: every HSTU block in ``module`` runs its eager methods again."""
    for block in hstu_blocks(module):
        for name in _ALL_METHODS:
            if isinstance(block.__dict__.get(name), _CompiledMethod):
                delattr(block, name)
    return module


def compiled_scope(block: nn.Module) -> str | None:
    """The scope ``compile_hstu_blocks`` compiled ``block`` with, or None when it runs eagerly."""
    for scope, names in SCOPES.items():
        if all(isinstance(block.__dict__.get(name), _CompiledMethod) for name in names):
            return scope
    return None


def is_compiled(block: nn.Module) -> bool:
    """Whether ``compile_hstu_blocks`` compiled ``block`` (either scope)."""
    return compiled_scope(block) is not None


__all__ = [
    "COMPILE_MODES",
    "SCOPES",
    "compile_hstu_blocks",
    "compiled_scope",
    "hstu_blocks",
    "is_compiled",
    "uncompile_hstu_blocks",
]
