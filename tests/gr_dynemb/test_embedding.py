"""DynamicEmbedding against dense twins: nn.Embedding + torch optimizers over many steps, admission, eval reads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gr_dynemb import (
    DynamicEmbedding,
    DynamicEmbeddingConfig,
    DynamicTableConfig,
    FusedOptimizerConfig,
    InitializerConfig,
)

DIM = 6
VOCAB = 40


def make(kind: str, lr: float, **kw: object) -> DynamicEmbedding:
    table = DynamicTableConfig(dim=DIM, capacity=1024, initializer=InitializerConfig("normal", std=0.5, seed=1))
    return DynamicEmbedding(DynamicEmbeddingConfig(table, FusedOptimizerConfig(kind, lr=lr), **kw))  # type: ignore[arg-type]


def twin_of(module: DynamicEmbedding, ids: torch.Tensor, sparse: bool) -> tuple[nn.Embedding, torch.Tensor]:
    """A dense table whose row r is the dynamic table's initial row for the r-th distinct (sparse) id."""
    keys = ids.unique()
    emb = nn.Embedding(keys.numel(), DIM, sparse=sparse)
    with torch.no_grad():
        emb.weight.copy_(module.table.initial_rows(keys)[:, :DIM])
    return emb, keys


def to_rows(ids: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return torch.searchsorted(keys, ids)


@pytest.mark.parametrize(
    ("kind", "make_opt", "sparse"),
    [
        ("sgd", lambda p, lr: torch.optim.SGD(p, lr=lr), False),
        ("adagrad", lambda p, lr: torch.optim.Adagrad(p, lr=lr, eps=1e-8), False),
        ("adam", lambda p, lr: torch.optim.SparseAdam(p, lr=lr, eps=1e-8), True),
    ],
)
def test_fused_optimizers_match_torch_over_many_steps(kind: str, make_opt, sparse: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    # Sparse int64 ids spread over the whole range, with repeats inside batches.
    vocab = torch.randint(-(2**62), 2**62, (VOCAB,), generator=gen)
    batches = [vocab[torch.randint(VOCAB, (3, 7), generator=gen)] for _ in range(25)]
    targets = [torch.randn(3, 7, DIM, generator=gen) for _ in batches]
    module = make(kind, lr=0.05)
    twin, keys = twin_of(module, torch.cat([b.reshape(-1) for b in batches]), sparse)
    opt = make_opt(twin.parameters(), 0.05)
    for ids, target in zip(batches, targets, strict=True):
        out = module(ids)
        ((out - target) ** 2).sum().backward()
        ref = twin(to_rows(ids, keys))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        opt.zero_grad()
        ((ref - target) ** 2).sum().backward()
        opt.step()
    module.eval()
    torch.testing.assert_close(module(keys), twin.weight.detach(), rtol=1e-4, atol=1e-5)


def test_rowwise_adagrad_formula() -> None:
    module = make("rowwise_adagrad", lr=0.1)
    ids = torch.tensor([3, 3, 9])
    w0 = module.table.initial_rows(torch.tensor([3, 9]))[:, :DIM]
    out = module(ids)
    grad = torch.arange(3 * DIM, dtype=torch.float32).view(3, DIM) / 10
    out.backward(grad)
    g = torch.stack([grad[0] + grad[1], grad[2]])  # duplicates aggregated before the update
    s = (g * g).mean(dim=1, keepdim=True)
    expect = w0 - 0.1 * g / (s.sqrt() + 1e-8)
    rows, found = module.table.find(torch.tensor([3, 9]))
    assert bool(found.all())
    torch.testing.assert_close(rows[:, :DIM], expect)
    torch.testing.assert_close(rows[:, DIM:], s)


def test_admission_after_k_batches() -> None:
    module = make("sgd", lr=1.0, admit_after=3, default_value=0.25)
    ids = torch.tensor([11, 11, 12])
    for batch in range(3):
        out = module(ids)
        out.sum().backward()
        if batch < 2:  # not yet admitted: default rows, no slot, gradient dropped
            assert torch.equal(out, torch.full((3, DIM), 0.25))
            assert module.table.size() == 0
    assert module.table.size() == 2  # admitted on the third sighting, then trained
    assert module.unadmitted == 4
    rows, _ = module.table.find(torch.tensor([11, 12]))
    init = module.table.initial_rows(torch.tensor([11, 12]))
    torch.testing.assert_close(rows[:, :DIM], init[:, :DIM] - torch.tensor([[2.0], [1.0]]))


def test_eval_reads_without_inserting() -> None:
    module = make("sgd", lr=0.1, default_value=-1.0)
    module(torch.tensor([1, 2])).sum().backward()
    module.eval()
    out = module(torch.tensor([[1, 5]]))
    assert out.shape == (1, 2, DIM)
    assert torch.equal(out[0, 1], torch.full((DIM,), -1.0))
    assert module.table.size() == 2


def test_bad_input() -> None:
    module = make("sgd", lr=0.1)
    with pytest.raises(TypeError, match="int64"):
        module(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="optimizer kind"):
        FusedOptimizerConfig("rmsprop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="admit_after"):
        DynamicEmbeddingConfig(DynamicTableConfig(dim=2), admit_after=-1)
