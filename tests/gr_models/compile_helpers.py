"""Shared by the torch.compile tests of the HSTU blocks: Dynamo's compile counters and jagged input batches."""

from __future__ import annotations

import torch
from torch import nn
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


def train_pass(enc: nn.Module, batch: tuple, **kw) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Output, input gradient and every parameter's gradient of one forward/backward (gradients cleared first)."""
    x, offsets, max_len, ts = batch
    enc.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = enc(x, offsets, max_len, ts, ts + 5, **kw)
    # A loss that weights every output element differently, so a wrong row or column cannot cancel.
    (y * torch.linspace(-1.0, 2.0, y.numel()).reshape(y.shape)).sum().backward()
    return y.detach(), x.grad, {name: p.grad for name, p in enc.named_parameters()}


def assert_passes_equal(got: tuple, want: tuple) -> None:
    """Two ``train_pass`` results equal within fp32 CPU tolerance: Inductor fuses LayerNorm/SiLU/residual (other
    summation orders than eager), the attention op is the same."""
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert got[2].keys() == want[2].keys()
    for name, grad in want[2].items():
        assert grad is not None and got[2][name] is not None, name
        torch.testing.assert_close(got[2][name], grad, rtol=1e-4, atol=1e-5, msg=name)
