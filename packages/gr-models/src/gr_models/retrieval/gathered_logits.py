"""Dot products of each query with K of a set of candidate rows chosen by index: ``<q_n, c[index[n, k]]>``.

The plain form ``einsum("nd,nkd->nk", q, c[index])`` materialises the ``[N, K, D]`` gather (and autograd keeps it
for backward): for in-batch negatives of a long-sequence batch (N = 64k tokens, K = 32, D = 512) that is 4 GB in fp32.
``gathered_logits`` computes the same ``[N, K]`` logits and gradients without it, by one of two backends:

- ``triton`` (CUDA tensors when triton is importable: ``gathered_logits_triton``): kernels that read the picked rows
  straight from the operands, and a grad_c summed per candidate over its picks sorted by candidate (no atomics).
- ``torch`` (everything else, and the reference of the tests): chunk by chunk in PyTorch, at most
  ``CHUNK_ELEMENTS`` of gathered rows alive at a time, grad_c by ``index_add_``.

``backend=`` or the ``GR_MODELS_GATHERED_LOGITS`` environment variable (``auto`` | ``torch`` | ``triton``, read per
call; the argument wins) forces one; ``triton`` on CPU tensors runs the kernels in Triton's interpreter (slow: tests).
``in_batch_logits`` picks between ``gathered_logits`` and scoring every candidate once (``q @ c^T``, then a gather),
which is cheaper while N is small.
"""

from __future__ import annotations

import os

import torch

from gr_models.retrieval import gathered_logits_triton

CHUNK_ELEMENTS = 1 << 26  # gathered elements per chunk (128 MB in bf16): the chunked form's memory bound
DENSE_MAX_ELEMENTS = 1 << 26  # largest [N, N] score matrix in_batch_logits computes in full
BACKEND_ENV = "GR_MODELS_GATHERED_LOGITS"
BACKENDS = ("auto", "torch", "triton")


def reference_gathered_logits(queries: torch.Tensor, candidates: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch reference: ``[N, K]`` with ``out[n, k] = <queries[n], candidates[index[n, k]]>``."""
    return torch.einsum("nd,nkd->nk", queries, candidates[index])


class _GatheredLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries: torch.Tensor, candidates: torch.Tensor, index: torch.Tensor, chunk: int) -> torch.Tensor:  # type: ignore[override]
        out = queries.new_empty(index.shape)
        for s in range(0, index.size(0), chunk):
            rows = candidates[index[s : s + chunk]]  # [c, K, D]
            out[s : s + chunk] = torch.bmm(rows, queries[s : s + chunk].unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(queries, candidates, index)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        queries, candidates, index = ctx.saved_tensors
        chunk = ctx.chunk
        grad = grad.to(queries.dtype)
        want_q, want_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_q = torch.empty_like(queries) if want_q else None
        # Accumulated in fp32 at least: a popular candidate collects one term per (query, draw) that picked it.
        acc = torch.promote_types(candidates.dtype, torch.float32)
        grad_c = torch.zeros(candidates.shape, dtype=acc, device=candidates.device) if want_c else None
        d = queries.size(1)
        with torch.autocast(queries.device.type, enabled=False):
            for s in range(0, index.size(0), chunk):
                g = grad[s : s + chunk]  # [c, K]
                idx = index[s : s + chunk]
                if grad_q is not None:
                    grad_q[s : s + chunk] = torch.bmm(g.unsqueeze(1), candidates[idx]).squeeze(1)
                if grad_c is not None:
                    terms = g.unsqueeze(-1) * queries[s : s + chunk].unsqueeze(1)  # [c, K, D]
                    grad_c.index_add_(0, idx.reshape(-1), terms.reshape(idx.numel(), d).to(acc))
        return grad_q, None if grad_c is None else grad_c.to(candidates.dtype), None, None


def _operands(queries: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both operands in one dtype: autocast's when it is on (as a matmul would run), else their promoted dtype."""
    device = queries.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(queries.dtype, candidates.dtype)
    return queries.to(dtype), candidates.to(dtype)


def resolve_backend(backend: str | None, queries: torch.Tensor, candidates: torch.Tensor) -> str:
    """``torch`` or ``triton`` for this call: the argument, else ``GR_MODELS_GATHERED_LOGITS``, else ``auto`` (Triton
    for CUDA operands of a dtype its kernels take when triton is importable)."""
    choice = backend if backend is not None else os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        source = "backend" if backend is not None else BACKEND_ENV
        raise ValueError(f"gathered_logits {source} must be one of {BACKENDS}, got {choice!r}")
    if choice != "auto":
        return choice
    fits = queries.dtype == candidates.dtype and queries.dtype in gathered_logits_triton.SUPPORTED_DTYPES
    if queries.is_cuda and fits and gathered_logits_triton.triton_available():
        return "triton"
    return "torch"


def gathered_logits(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    index: torch.Tensor,
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
    backend: str | None = None,
) -> torch.Tensor:
    """``[N, K]`` logits ``<queries[n], candidates[index[n, k]]>`` without materialising ``candidates[index]``
    whole; gradients flow to ``queries`` and to the indexed ``candidates`` rows. ``queries``: ``[N, D]``,
    ``candidates``: ``[M, D]``, ``index``: int64 ``[N, K]`` in ``[0, M)``. ``chunk_elements`` bounds the torch
    backend's gathered chunk; ``backend``: see the module docstring."""
    if queries.dim() != 2 or candidates.dim() != 2 or index.dim() != 2:
        raise ValueError(
            f"gathered_logits needs queries [N, D], candidates [M, D] and index [N, K], got "
            f"{tuple(queries.shape)}, {tuple(candidates.shape)}, {tuple(index.shape)}"
        )
    if queries.size(1) != candidates.size(1) or index.size(0) != queries.size(0):
        raise ValueError(
            f"gathered_logits shapes disagree: queries {tuple(queries.shape)}, candidates {tuple(candidates.shape)}, "
            f"index {tuple(index.shape)}"
        )
    if index.dtype != torch.int64:
        raise TypeError(f"gathered_logits index must be int64, got {index.dtype}")
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    chunk = max(1, chunk_elements // max(1, index.size(1) * queries.size(1)))
    q, c = _operands(queries, candidates)
    use = resolve_backend(backend, q, c)
    with torch.autocast(queries.device.type, enabled=False):
        if use == "triton":
            return gathered_logits_triton.triton_gathered_logits(q, c, index)
        return _GatheredLogits.apply(q, c, index, chunk)


def in_batch_logits(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    index: torch.Tensor,
    *,
    dense_max_elements: int | None = None,
    chunk_elements: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``gathered_logits`` by the cheaper route: while the ``[N, M]`` score matrix is small (``N * M <=
    dense_max_elements`` and ``M <= K * D``, where one matmul beats gathering ``K`` rows per query), every candidate
    is scored once and the ``K`` picks gathered from it; otherwise the chunked gather. None: the module's
    ``DENSE_MAX_ELEMENTS`` / ``CHUNK_ELEMENTS``; ``backend``: ``gathered_logits``'."""
    dense_max_elements = DENSE_MAX_ELEMENTS if dense_max_elements is None else dense_max_elements
    chunk_elements = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    n, m = queries.size(0), candidates.size(0)
    if n * m <= dense_max_elements and m <= index.size(1) * queries.size(1):
        return (queries @ candidates.T).gather(1, index)
    return gathered_logits(queries, candidates, index, chunk_elements=chunk_elements, backend=backend)
