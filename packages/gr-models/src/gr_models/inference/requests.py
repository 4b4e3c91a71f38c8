"""Typed pieces of a scoring request: a user's events and the candidates to score (CPU int64 tensors)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


class InferenceInputError(ValueError):
    """A request is malformed (shapes, id ranges, time order); the message names the field. Servers answer 4xx."""


def _ids(name: str, values: torch.Tensor | Sequence[int]) -> torch.Tensor:
    try:
        t = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InferenceInputError(f"{name} must be a list of integers: {exc}") from exc
    if t.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    if t.dim() != 1:
        raise InferenceInputError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise InferenceInputError(f"{name} must hold integers, got {t.dtype}")
    return t.to(device="cpu", dtype=torch.int64)


def _bags(name: str, bags: Sequence[Sequence[int]] | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    if bags is None:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)
    if len(bags) != n:
        raise InferenceInputError(f"{name} has {len(bags)} bags for {n} items")
    values = [v for bag in bags for v in bag]
    return _ids(f"{name} values", values), torch.as_tensor([len(b) for b in bags], dtype=torch.int64).reshape(n)


@dataclass(frozen=True)
class UserEvents:
    """Chronological events of one user: item ids, the action taken (e.g. the rating), unix timestamps, and each
    item's bag (genres): ``bag_values`` concatenated, ``bag_lengths[i]`` values for event ``i``."""

    items: torch.Tensor  # int64 [n]
    actions: torch.Tensor  # int64 [n]
    timestamps: torch.Tensor  # int64 [n], non-decreasing
    bag_values: torch.Tensor  # int64 [nnz]
    bag_lengths: torch.Tensor  # int64 [n]

    def __post_init__(self) -> None:
        n = self.items.numel()
        for name in ("items", "actions", "timestamps", "bag_values", "bag_lengths"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.int64 or t.device.type != "cpu":
                raise InferenceInputError(f"UserEvents.{name} must be a 1-D int64 CPU tensor")
        for name in ("actions", "timestamps", "bag_lengths"):
            if getattr(self, name).numel() != n:
                raise InferenceInputError(f"UserEvents.{name} has {getattr(self, name).numel()} entries, items {n}")
        if int(self.bag_lengths.sum()) != self.bag_values.numel() or (self.bag_lengths < 0).any():
            raise InferenceInputError("UserEvents.bag_lengths must be >= 0 and sum to len(bag_values)")
        if n > 1 and (self.timestamps[1:] < self.timestamps[:-1]).any():
            raise InferenceInputError("UserEvents.timestamps must be non-decreasing (events in time order)")

    @classmethod
    def empty(cls) -> UserEvents:
        z = torch.zeros(0, dtype=torch.int64)
        return cls(z, z, z, z, z)

    @classmethod
    def from_lists(
        cls,
        items: Sequence[int] | torch.Tensor,
        actions: Sequence[int] | torch.Tensor,
        timestamps: Sequence[int] | torch.Tensor,
        bags: Sequence[Sequence[int]] | None = None,
    ) -> UserEvents:
        """From plain lists (e.g. decoded JSON); ``bags[i]`` is event ``i``'s bag, None for no bags."""
        items_t = _ids("events.items", items)
        values, lengths = _bags("events.bags", bags, items_t.numel())
        return cls(items_t, _ids("events.actions", actions), _ids("events.timestamps", timestamps), values, lengths)

    def __len__(self) -> int:
        return self.items.numel()

    @property
    def last_timestamp(self) -> int | None:
        return int(self.timestamps[-1]) if len(self) else None

    def concat(self, other: UserEvents) -> UserEvents:
        return UserEvents(
            *(torch.cat([getattr(self, n), getattr(other, n)]) for n in ("items", "actions", "timestamps")),
            torch.cat([self.bag_values, other.bag_values]),
            torch.cat([self.bag_lengths, other.bag_lengths]),
        )

    def tail(self, n: int) -> UserEvents:
        """The last ``n`` events."""
        start = max(len(self) - n, 0)
        bag_start = int(self.bag_lengths[:start].sum())
        return UserEvents(
            self.items[start:],
            self.actions[start:],
            self.timestamps[start:],
            self.bag_values[bag_start:],
            self.bag_lengths[start:],
        )


@dataclass(frozen=True)
class Candidates:
    """Items to score for one request. ``timestamps`` (one per candidate) default to the request time."""

    items: torch.Tensor  # int64 [M]
    bag_values: torch.Tensor  # int64 [nnz]
    bag_lengths: torch.Tensor  # int64 [M]
    timestamps: torch.Tensor | None = None  # int64 [M]

    def __post_init__(self) -> None:
        m = self.items.numel()
        for name in ("items", "bag_values", "bag_lengths", "timestamps"):
            t = getattr(self, name)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.int64 or t.device.type != "cpu":
                raise InferenceInputError(f"Candidates.{name} must be a 1-D int64 CPU tensor")
        if self.bag_lengths.numel() != m or (self.timestamps is not None and self.timestamps.numel() != m):
            raise InferenceInputError(f"Candidates.bag_lengths/timestamps must have one entry per item ({m})")
        if int(self.bag_lengths.sum()) != self.bag_values.numel() or (self.bag_lengths < 0).any():
            raise InferenceInputError("Candidates.bag_lengths must be >= 0 and sum to len(bag_values)")

    @classmethod
    def from_lists(
        cls,
        items: Sequence[int] | torch.Tensor,
        bags: Sequence[Sequence[int]] | None = None,
        timestamps: Sequence[int] | torch.Tensor | None = None,
    ) -> Candidates:
        items_t = _ids("candidates.items", items)
        values, lengths = _bags("candidates.bags", bags, items_t.numel())
        ts = None if timestamps is None else _ids("candidates.timestamps", timestamps)
        return cls(items_t, values, lengths, ts)

    def __len__(self) -> int:
        return self.items.numel()

    def slice(self, start: int, end: int) -> Candidates:
        bag_start = int(self.bag_lengths[:start].sum())
        bag_end = bag_start + int(self.bag_lengths[start:end].sum())
        ts = None if self.timestamps is None else self.timestamps[start:end]
        return Candidates(self.items[start:end], self.bag_values[bag_start:bag_end], self.bag_lengths[start:end], ts)
