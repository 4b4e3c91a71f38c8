"""All-to-all of row blocks over ``torch.distributed`` (gloo on CPU, NCCL on CUDA), with autograd."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torchrec.distributed import comm_ops


def exchange_counts(send_counts: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Every rank sends ``send_counts[r]`` rows to rank r; returns how many rows each rank sends to this one."""
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts.contiguous(), group=group)
    return recv


def all_to_all_rows(x: Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup | None) -> Tensor:
    """Sends ``x``'s rows in blocks of ``send[r]`` to rank r and returns the ``sum(recv)`` rows received (rank
    order); no gradient."""
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup | None) -> Tensor:  # type: ignore[override]
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return all_to_all_rows(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # The gradient of a row goes back to the rank the row came from: the same exchange, reversed. Like TorchRec's
        # own embedding all-to-alls (comm_ops.GRADIENT_DIVISION, on by default) it is divided by the world size, so
        # sharded tables see the mean of the ranks' gradients, as DDP's dense parameters do.
        out = all_to_all_rows(grad, ctx.recv, ctx.send, ctx.group)
        if comm_ops.get_gradient_division():
            out = out / dist.get_world_size(ctx.group)
        return out, None, None, None


def all_to_all_rows_autograd(x: Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup | None) -> Tensor:
    """``all_to_all_rows`` whose backward sends the gradients back along the same routes."""
    return _AllToAllRows.apply(x, send, recv, group)
