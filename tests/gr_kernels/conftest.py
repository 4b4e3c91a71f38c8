"""Fixtures of the gr_kernels tests: random jagged inputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch


class Jagged(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    seq_offsets: torch.Tensor
    max_seq_len: int
    rab: torch.Tensor | None


def make_jagged(
    lengths: list[int],
    *,
    heads: int = 2,
    attn_dim: int = 4,
    hidden_dim: int = 3,
    max_seq_len: int | None = None,
    rab_heads: int = 0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    requires_grad: bool = True,
) -> Jagged:
    """Random q/k/v (and rab with ``rab_heads`` heads, none when 0) for sequences of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    n = max_seq_len or max([*lengths, 1])
    total = sum(lengths)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_(requires_grad)

    q, k, v = rand(total, heads, attn_dim), rand(total, heads, attn_dim), rand(total, heads, hidden_dim)
    offsets = torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], device=device)
    rab = rand(len(lengths), rab_heads, n, n) if rab_heads else None
    return Jagged(q, k, v, offsets, n, rab)


@pytest.fixture(scope="session")
def jagged() -> Callable[..., Jagged]:
    return make_jagged
