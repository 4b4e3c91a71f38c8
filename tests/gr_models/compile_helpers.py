"""Shared by the torch.compile tests of the HSTU blocks: Dynamo's compile counters and jagged input batches."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters


def compile_counts() -> dict[str, int]:
    """Frames compiled, unique graphs, AOTAutograd compilations and graph breaks so far (process-wide counters)."""
    return {
        "frames": counters["frames"]["total"],
        "graphs": counters["stats"]["unique_graphs"],
        "aot": counters["aot_autograd"]["total"],
        "breaks": sum(counters["graph_break"].values()),
    }


def counts_since(before: dict[str, int]) -> dict[str, int]:
    return {k: v - before[k] for k, v in compile_counts().items()}


def jagged_batch(lengths: list[int], seed: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """``(x [total, dim], seq_offsets, max_seq_len, sorted timestamps)`` for sequences of ``lengths``."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    total = int(offsets[-1])
    timestamps = torch.randint(0, 10_000, (total,), generator=g).sort().values
    return torch.randn(total, dim, generator=g), offsets, max(lengths), timestamps
