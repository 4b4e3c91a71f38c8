"""Shared by the fused-op tests (norm_mul, silu_projection, residual_linear): an HSTU block with a fused path against
the same block without it, on one small jagged batch: outputs and the gradients of the input and every parameter."""

from __future__ import annotations

import dataclasses

import torch

from gr_models.modules.hstu import HSTUBlock, HSTUConfig

# Three sequences of 3, 5 and 2 tokens, dim 16, 2 heads, every fused path off: tests switch one on.
UNFUSED = HSTUConfig(
    embedding_dim=16,
    num_heads=2,
    max_seq_len=8,
    dropout=0.0,
    use_rab=False,
    attention_backend="reference",
    fused_norms=False,
    fused_projection=False,
    fused_residual=False,
)


def assert_fused_block_equals_unfused(rtol: float, atol: float, grad_rtol: float, grad_atol: float, **fused) -> None:
    """``HSTUBlock(UNFUSED with **fused)`` against ``HSTUBlock(UNFUSED)`` of the same weights."""
    torch.manual_seed(0)
    eager = HSTUBlock(UNFUSED)
    fused_block = HSTUBlock(dataclasses.replace(UNFUSED, **fused))
    fused_block.load_state_dict(eager.state_dict())
    offsets = torch.tensor([0, 3, 8, 10])
    x = torch.randn(10, 16, requires_grad=True)
    outs, grads = [], []
    for block in (eager, fused_block):
        y = block(x, offsets, 7, None)
        outs.append(y)
        grads.append(torch.autograd.grad((y * torch.arange(16.0)).sum(), [x, *block.parameters()]))
    torch.testing.assert_close(outs[1], outs[0], rtol=rtol, atol=atol)
    for a, r in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, r, rtol=grad_rtol, atol=grad_atol)


def assert_cuda_block_close_under_autocast(off: dict, on: dict) -> None:
    """On CUDA under bf16 autocast, ``HSTUBlock`` of dim 512 / 4 heads with the config fields ``on`` against the same
    weights with ``off``: outputs within 2e-2, gradients of the input and every parameter within 3% of their
    largest magnitude (both sides round differently in bf16)."""
    cfg = HSTUConfig(embedding_dim=512, num_heads=4, max_seq_len=512, dropout=0.0, use_rab=False, **off)
    torch.manual_seed(0)
    eager = HSTUBlock(cfg).cuda()
    fused = HSTUBlock(dataclasses.replace(cfg, **on)).cuda()
    fused.load_state_dict(eager.state_dict())
    offsets = torch.tensor([0, 300, 812, 1000], device="cuda")
    x = torch.randn(1000, 512, device="cuda", requires_grad=True)
    outs, grads = [], []
    for block in (eager, fused):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = block(x, offsets, 512, None)
        outs.append(y.float())
        grads.append(torch.autograd.grad(y.float().square().sum(), [x, *block.parameters()]))
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-2)
    for a, r in zip(grads[1], grads[0], strict=True):
        assert (a - r).abs().max() <= 3e-2 * max(r.abs().max().item(), 1e-3)
