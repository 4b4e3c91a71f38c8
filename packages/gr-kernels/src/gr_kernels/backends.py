"""Backend registry of ``hstu_attention``: where native kernels (CUTLASS sm90, Triton, ...) plug in.

A backend is any object with

- ``priority: int`` -- ``backend="auto"`` tries higher priorities first (ties: earlier registration first);
- ``supports(call: AttentionCall) -> str | None`` -- None if it can run the call, else a human-readable reason;
- ``forward(q, k, v, seq_offsets, num_targets, rab, params: HSTUParams) -> Tensor``;
- ``backward(grad_out, q, k, v, seq_offsets, num_targets, rab, params) -> (dq, dk, dv, drab or None)``,

with the semantics of ``gr_kernels.reference``, and optionally

- ``auto_skip(call: AttentionCall) -> str | None`` -- a reason for ``backend="auto"`` to pass over a call the backend
  can run (e.g. one where it is known to be slower than the next backend); naming the backend still runs it.

Delta q (``call.delta_q``, queries shorter than keys) is a capability:
a backend that runs it takes a keyword ``q_offsets`` in both ``forward`` and ``backward`` (passed only for delta-q
calls, with ``params.max_q_len`` set); a backend whose methods take no ``q_offsets`` is never handed a delta-q call.
Skipping the bias gradient is one too: a backend whose ``backward`` takes a keyword ``need_drab`` is passed
``need_drab=False`` when rab needs no gradient (a frozen bias) and then need not compute drab; any other backend
computes it and the op drops it.
The built-in ``"reference"`` backend supports every call and is always tried last. When ``"auto"`` skips a backend
it logs one line per (backend, reason) per process on the ``gr_kernels`` logger at INFO level; under
``torch.compile`` the choice is made while tracing, where nothing is logged (Dynamo cannot trace logging calls), so
run one eager call to see the reasons.
"""

from __future__ import annotations

import inspect
import logging
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from gr_kernels.params import AttentionCall, HSTUParams
from gr_kernels.reference import ReferenceBackend

log = logging.getLogger("gr_kernels")

REFERENCE = "reference"


@runtime_checkable
class HSTUAttentionBackend(Protocol):
    priority: int

    def supports(self, call: AttentionCall) -> str | None: ...

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
    ) -> Tensor: ...

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
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]: ...


_BACKENDS: dict[str, HSTUAttentionBackend] = {REFERENCE: ReferenceBackend()}
_LOGGED_SKIPS: set[tuple[str, str]] = set()
# Capabilities, decided at registration (signatures are not traceable): backends whose forward and backward take
# q_offsets, and those whose backward takes need_drab.
_DELTA_Q: set[str] = {REFERENCE}
_NEED_DRAB: set[str] = {REFERENCE}


def _takes_keyword(method: object, name: str) -> bool:
    try:
        params = inspect.signature(method).parameters.values()  # type: ignore[arg-type]
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def skips_drab(name: str) -> bool:
    """Whether backend ``name``'s backward takes ``need_drab`` (and so can leave out a frozen bias's gradient)."""
    return name in _NEED_DRAB


def register_backend(name: str, backend: HSTUAttentionBackend, *, replace: bool = False) -> None:
    """Registers ``backend`` under ``name``; ``replace=True`` overrides an existing registration."""
    if not isinstance(name, str) or not name.isidentifier() or name == "auto":
        raise ValueError(f"backend name must be a Python identifier other than 'auto', got {name!r}")
    if name == REFERENCE:
        raise ValueError("the 'reference' backend is built in and cannot be replaced")
    for attr in ("forward", "backward", "supports"):
        if not callable(getattr(backend, attr, None)):
            raise TypeError(f"backend {name!r} has no callable {attr}()")
    if not isinstance(getattr(backend, "priority", None), int):
        raise TypeError(f"backend {name!r} needs an int priority, got {getattr(backend, 'priority', None)!r}")
    if name in _BACKENDS and not replace:
        raise ValueError(f"backend {name!r} is already registered (pass replace=True to override it)")
    _BACKENDS[name] = backend
    _DELTA_Q.discard(name)
    _NEED_DRAB.discard(name)
    if _takes_keyword(backend.forward, "q_offsets") and _takes_keyword(backend.backward, "q_offsets"):
        _DELTA_Q.add(name)
    if _takes_keyword(backend.backward, "need_drab"):
        _NEED_DRAB.add(name)


def unregister_backend(name: str) -> None:
    """Removes a registered backend (no-op if absent); the reference cannot be removed."""
    if name == REFERENCE:
        raise ValueError("the 'reference' backend cannot be unregistered")
    _BACKENDS.pop(name, None)
    _DELTA_Q.discard(name)
    _NEED_DRAB.discard(name)


def _ranked() -> list[str]:
    # sorted() is stable, so equal priorities keep registration order; the reference always comes last.
    natives = sorted((n for n in _BACKENDS if n != REFERENCE), key=lambda n: -_BACKENDS[n].priority)
    return [*natives, REFERENCE]


def available_backends() -> list[str]:
    """Registered backend names in the order ``backend="auto"`` tries them."""
    return _ranked()


def get_backend(name: str) -> HSTUAttentionBackend:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown hstu_attention backend {name!r}; registered: {available_backends()}") from None


def resolve_backend(name: str, call: AttentionCall) -> str:
    """Concrete backend name for ``name`` ("auto" or a registered name) and this call.

    Raises ValueError for an unknown name or a forced backend that cannot run the call.
    """
    if name != "auto":
        get_backend(name)  # unknown names: the error lists the registered ones
        reason = _why_not(name, call)
        if reason is not None:
            raise ValueError(f"hstu_attention backend {name!r} cannot run this call: {reason}")
        return name
    for candidate in _ranked():
        reason = _why_not(candidate, call)
        if reason is None and candidate != REFERENCE:
            auto_skip = getattr(_BACKENDS[candidate], "auto_skip", None)
            reason = auto_skip(call) if callable(auto_skip) else None
        if reason is None:
            return candidate
        if not torch.compiler.is_compiling():
            _log_skip_once(candidate, reason)
    raise RuntimeError("no hstu_attention backend supports this call")  # unreachable: the reference runs all


def _why_not(name: str, call: AttentionCall) -> str | None:
    """The backend's own reason, else the registry's: delta q needs q_offsets in its forward and backward."""
    reason = _BACKENDS[name].supports(call)
    if reason is None and call.delta_q and name not in _DELTA_Q:
        reason = "delta q (q_offsets) is not supported: its forward/backward take no q_offsets argument"
    return reason


def _log_skip_once(name: str, reason: str) -> None:
    if (name, reason) in _LOGGED_SKIPS:
        return
    _LOGGED_SKIPS.add((name, reason))
    log.info("hstu_attention: backend %r not used: %s", name, " ".join(reason.split()))
