"""Backend registry of ``hstu_attention``: where native kernels (CUTLASS sm90, Triton, ...) plug in.

A backend provides ``forward`` and ``backward`` with the reference's signatures (see ``gr_kernels.reference``)
and ``supports(call) -> str | None`` (None = can run this call, else the human-readable reason it cannot).
``backend="auto"`` picks the highest-priority backend that supports the call; every higher-priority backend it
skips is logged once per (backend, reason).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gr_kernels.reference import reference_backward, reference_forward

log = logging.getLogger("gr_kernels")


@dataclass(frozen=True)
class AttentionCall:
    """What a backend may need to know to decide whether it can run a call (no tensor values)."""

    device: torch.device
    dtype: torch.dtype
    num_heads: int
    attention_dim: int
    hidden_dim: int
    max_seq_len: int
    causal: bool
    max_attn_len: int
    contextual_seq_len: int
    has_targets: bool
    target_group_size: int
    has_rab: bool
    rab_heads: int
    dropout_p: float
    requires_grad: bool


@dataclass(frozen=True)
class HSTUAttentionBackend:
    name: str
    forward: Callable[..., torch.Tensor]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]
    supports: Callable[[AttentionCall], str | None]
    priority: int = 0


_BACKENDS: dict[str, HSTUAttentionBackend] = {}
_LOGGED_SKIPS: set[tuple[str, str]] = set()


def register_backend(backend: HSTUAttentionBackend, *, replace: bool = False) -> None:
    if backend.name in ("auto", "") or not backend.name.isidentifier():
        raise ValueError(f"invalid backend name {backend.name!r}")
    if backend.name in _BACKENDS and not replace:
        raise ValueError(f"backend {backend.name!r} is already registered (pass replace=True to override it)")
    _BACKENDS[backend.name] = backend


def unregister_backend(name: str) -> None:
    if name == "reference":
        raise ValueError("the reference backend cannot be unregistered")
    _BACKENDS.pop(name, None)


def available_backends() -> list[str]:
    """Registered backend names, highest priority first."""
    return [b.name for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority)]


def get_backend(name: str) -> HSTUAttentionBackend:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown hstu_attention backend {name!r}; registered: {available_backends()}") from None


def resolve_backend(name: str, call: AttentionCall) -> str:
    """Concrete backend name for ``name`` ("auto" or a registered name) and this call."""
    if name != "auto":
        backend = get_backend(name)
        reason = backend.supports(call)
        if reason is not None:
            raise ValueError(f"hstu_attention backend {name!r} cannot run this call: {reason}")
        return name
    for backend in sorted(_BACKENDS.values(), key=lambda b: -b.priority):
        reason = backend.supports(call)
        if reason is None:
            return backend.name
        if (backend.name, reason) not in _LOGGED_SKIPS:
            _LOGGED_SKIPS.add((backend.name, reason))
            log.info("hstu_attention: backend %r not used: %s", backend.name, reason)
    raise RuntimeError("no hstu_attention backend supports this call")  # unreachable: reference supports all


register_backend(
    HSTUAttentionBackend(
        name="reference",
        forward=reference_forward,
        backward=reference_backward,
        supports=lambda call: None,
        priority=-100,
    )
)
