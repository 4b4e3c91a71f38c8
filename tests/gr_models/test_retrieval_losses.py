"""In-batch negatives gathered from the target embeddings (no table lookup) against the lookup path, and the chunked
gathered-logits op against its plain einsum reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gr_models.retrieval import gathered_logits as gl
from gr_models.retrieval.losses import SampledSoftmaxLoss


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    m=st.integers(1, 30),
    k=st.integers(1, 9),
    d=st.integers(1, 12),
    chunk_elements=st.integers(1, 500),
    seed=st.integers(0, 2**16),
)
def test_gathered_logits_matches_einsum(n: int, m: int, k: int, d: int, chunk_elements: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(m, d, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.randint(m, (n, k), generator=g)
    up = torch.randn(n, k, generator=g, dtype=torch.float64)

    got = gl.gathered_logits(q, c, index, chunk_elements=chunk_elements)
    gq, gc = torch.autograd.grad((got * up).sum(), (q, c))
    want = gl.reference_gathered_logits(q, c, index)
    wq, wc = torch.autograd.grad((want * up).sum(), (q, c))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gq, wq, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gc, wc, rtol=1e-12, atol=1e-12)

    dense = gl.in_batch_logits(q, c, index, dense_max_elements=n * m)  # scores every candidate, then gathers
    torch.testing.assert_close(dense, want, rtol=1e-12, atol=1e-12)


def test_gathered_logits_autocast_and_bad_input() -> None:
    q, c = torch.randn(5, 4), torch.randn(3, 4)
    index = torch.randint(3, (5, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gl.gathered_logits(q, c, index)
    assert out.dtype == torch.bfloat16  # like the einsum it replaces under autocast
    torch.testing.assert_close(out.float(), gl.reference_gathered_logits(q, c, index), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="shapes disagree"):
        gl.gathered_logits(q, c[:, :3], index)
    with pytest.raises(TypeError, match="int64"):
        gl.gathered_logits(q, c, index.int())


def _lookup_path_loss(loss_fn: SampledSoftmaxLoss, q, targets, table) -> torch.Tensor:
    """The pre-gather loss: positives and the drawn negative ids both looked up through the table."""
    negatives = loss_fn.sample_negatives(targets)
    emb = lambda ids: F.normalize(table[ids], dim=-1)  # noqa: E731
    pos = (q * emb(targets)).sum(-1, keepdim=True)
    neg = torch.einsum("nd,nkd->nk", q, emb(negatives))
    neg = neg.masked_fill(negatives == targets.unsqueeze(1), float("-inf"))
    return F.cross_entropy(torch.cat([pos, neg], 1) / loss_fn.temperature, torch.zeros_like(targets))


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 30),
    k=st.integers(1, 8),
    d=st.integers(2, 10),
    num_items=st.integers(1, 50),
    dense=st.booleans(),
    pass_targets=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_in_batch_gather_equals_lookup(
    n: int, k: int, d: int, num_items: int, dense: bool, pass_targets: bool, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    table0 = torch.randn(num_items, d, generator=g)
    q0 = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    targets = torch.randint(num_items, (n,), generator=g)
    loss_fn = SampledSoftmaxLoss(num_items, num_negatives=k, temperature=0.1, negatives="in_batch")

    table, q = table0.clone().requires_grad_(), q0.clone().requires_grad_()
    torch.manual_seed(seed)
    want = _lookup_path_loss(loss_fn, q, targets, table)
    w_table, w_q = torch.autograd.grad(want, (table, q))

    table, q = table0.clone().requires_grad_(), q0.clone().requires_grad_()
    calls = []

    def embed(ids: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(ids.shape))
        return F.normalize(table[ids], dim=-1)

    saved = gl.DENSE_MAX_ELEMENTS
    gl.DENSE_MAX_ELEMENTS = saved if dense else 0  # 0: always the chunked gather
    torch.manual_seed(seed)  # the same draw
    try:
        got = loss_fn(q, targets, target_embeddings=embed(targets)) if pass_targets else loss_fn(q, targets, embed)
    finally:
        gl.DENSE_MAX_ELEMENTS = saved
    assert calls == [(n,)]  # the targets only: the negatives are gathered, never looked up
    g_table, g_q = torch.autograd.grad(got, (table, q))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_table, w_table, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_q, w_q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("bf16", ["autocast", "operands"])
def test_in_batch_bf16_scores_the_positive_like_the_negatives(dense: bool, bf16: str) -> None:
    """With bf16 operands (autocast's, or the caller's own) the positive is scored from the same bf16 rows as its
    negatives (one gather of 1 + K rows), and the softmax gets fp32 logits: the loss equals that formula computed by
    hand in fp32."""
    n, k, d, temperature = 24, 5, 16, 0.05
    g = torch.Generator().manual_seed(3)
    q = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    t = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    targets = torch.randint(7, (n,), generator=g)
    loss_fn = SampledSoftmaxLoss(7, num_negatives=k, temperature=temperature, negatives="in_batch")
    saved = gl.DENSE_MAX_ELEMENTS
    gl.DENSE_MAX_ELEMENTS = saved if dense else 0
    torch.manual_seed(11)
    try:
        if bf16 == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = loss_fn(q, targets, target_embeddings=t)
        else:
            got = loss_fn(q.bfloat16(), targets, target_embeddings=t.bfloat16())
    finally:
        gl.DENSE_MAX_ELEMENTS = saved
    torch.manual_seed(11)
    positions = loss_fn.sample_negative_positions(targets)
    qb, tb = q.bfloat16().float(), t.bfloat16().float()
    scores = (qb @ tb.T).bfloat16().float()  # the gather's output dtype is its operands' (bf16)
    pos = scores.diagonal().unsqueeze(1)
    neg = scores.gather(1, positions).masked_fill(targets[positions] == targets.unsqueeze(1), float("-inf"))
    want = F.cross_entropy(torch.cat([pos, neg], 1) / temperature, torch.zeros_like(targets))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_in_batch_without_item_embeddings_and_overridden_draws() -> None:
    q = F.normalize(torch.randn(6, 4), dim=-1)
    targets = torch.tensor([1, 2, 3, 1, 2, 9])
    t_emb = F.normalize(torch.randn(6, 4), dim=-1)
    in_batch = SampledSoftmaxLoss(10, num_negatives=3, negatives="in_batch")
    assert torch.isfinite(in_batch(q, targets, target_embeddings=t_emb))
    with pytest.raises(ValueError, match="must match queries"):
        in_batch(q, targets, target_embeddings=t_emb[:, :3])
    with pytest.raises(ValueError, match="'uniform' negatives needs item_embeddings"):
        SampledSoftmaxLoss(10, num_negatives=3)(q, targets, target_embeddings=t_emb)

    class Wider(SampledSoftmaxLoss):  # draws over more than this batch's targets: must look its ids up
        def sample_negatives(self, targets: torch.Tensor) -> torch.Tensor:
            return torch.full((targets.numel(), self.num_negatives), 7)

    wider = Wider(100, num_negatives=3, negatives="in_batch")  # 100 > K * D items: the [N, K] ids are looked up
    assert not wider.gathers_in_batch()
    with pytest.raises(ValueError, match="drawn by a subclass"):
        wider(q, targets, target_embeddings=t_emb)
    looked_up = []
    table = F.normalize(torch.randn(100, 4), dim=-1)
    wider(q, targets, lambda ids: looked_up.append(tuple(ids.shape)) or table[ids], target_embeddings=t_emb)
    assert looked_up == [(6, 3)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast", [False, True])
def test_gathered_logits_cuda(autocast: bool) -> None:
    """The torch backend on CUDA (index_add_ accumulates with atomics), chunked, fp32 and under bf16 autocast (the
    Triton backend, auto on CUDA, has its own tests: test_gathered_logits_triton.py)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    n, m, k, d = 3000, 2500, 32, 64
    q = torch.randn(n, d, device="cuda", generator=g, requires_grad=True)
    c = torch.randn(m, d, device="cuda", generator=g, requires_grad=True)
    index = torch.randint(m, (n, k), device="cuda", generator=g)
    up = torch.randn(n, k, device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        got = gl.gathered_logits(q, c, index, chunk_elements=100_000, backend="torch")
    gq, gc = torch.autograd.grad((got.float() * up).sum(), (q, c))
    qr, cr = (q.bfloat16().float(), c.bfloat16().float()) if autocast else (q, c)
    want = gl.reference_gathered_logits(qr.double(), cr.double(), index)
    wq, wc = torch.autograd.grad((want * up.double()).sum(), (q, c))
    tol = {"rtol": 2e-2, "atol": 5e-2} if autocast else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(got.double(), want, **tol)
    if not autocast:
        torch.testing.assert_close(gq.double(), wq.double(), **tol)
        torch.testing.assert_close(gc.double(), wc.double(), **tol)
        return
    # bf16: every g * x term is rounded to bf16 before its fp32 sum and the sum once more, so an element may be off
    # by 2^-8 of the sum of its terms' magnitudes plus 2^-9 of its value (bounds doubled here); a fixed atol fails
    # where terms cancel (small gradients built from large terms).
    qa, ca = (t.detach().abs().double().requires_grad_() for t in (qr, cr))
    aq, ac = torch.autograd.grad((gl.reference_gathered_logits(qa, ca, index) * up.abs().double()).sum(), (qa, ca))
    for name, x, w, magnitude in (("grad_q", gq, wq, aq), ("grad_c", gc, wc, ac)):
        err = (x.double() - w.double()).abs()
        assert (err <= 2**-7 * magnitude + 2**-8 * w.double().abs() + 1e-6).all(), f"{name}: max error {err.max()}"


def test_given_negatives_equal_drawn_ones_and_are_checked() -> None:
    torch.manual_seed(0)
    n, k, d, num_items = 7, 3, 4, 50
    table = F.normalize(torch.randn(num_items, d), dim=-1)
    q = F.normalize(torch.randn(n, d), dim=-1)
    targets = torch.randint(num_items, (n,))
    loss_fn = SampledSoftmaxLoss(num_items, num_negatives=k, temperature=0.1)
    torch.manual_seed(5)
    want = loss_fn(q, targets, lambda ids: table[ids])
    torch.manual_seed(5)
    negatives = loss_fn.sample_negatives(targets)
    got = loss_fn(
        q, targets, target_embeddings=table[targets], negatives=negatives, negative_embeddings=table[negatives]
    )
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="come together"):
        loss_fn(q, targets, target_embeddings=table[targets], negatives=negatives)
    with pytest.raises(ValueError, match=r"negatives must be \[7, K\]"):
        loss_fn(
            q, targets, target_embeddings=table[targets], negatives=negatives[1:], negative_embeddings=table[negatives]
        )


DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("negatives", ["uniform", "in_batch"])
def test_negative_draws_cost_the_host_rng_one_number_and_repeat_from_its_state(device: str, negatives: str) -> None:
    """A draw of any size advances the host generator by exactly one number, the same host state draws the same
    negatives (another loss object too: what data-parallel ranks rely on), and the device's default generator is
    left alone (dropout advances it differently on each rank)."""
    loss_fn = SampledSoftmaxLoss(1000, num_negatives=32, negatives=negatives)
    targets = torch.randint(1000, (5000,), device=device)
    torch.manual_seed(7)
    device_state = torch.cuda.get_rng_state() if device == "cuda" else None
    first = loss_fn.sample_negatives(targets)
    after_draw = torch.randint(2**30, (4,))
    torch.manual_seed(7)
    torch.randint(0, 2**62, (1,))  # the one number a draw takes
    assert torch.equal(after_draw, torch.randint(2**30, (4,)))
    if device_state is not None:
        assert torch.equal(torch.cuda.get_rng_state(), device_state)
    torch.manual_seed(7)
    again = SampledSoftmaxLoss(1000, num_negatives=32, negatives=negatives).sample_negatives(targets)
    assert first.shape == (5000, 32) and first.device == targets.device and torch.equal(first, again)
    pool = torch.arange(1000, device=device) if negatives == "uniform" else targets
    assert torch.isin(first, pool).all()
    if negatives == "uniform":
        assert first.unique().numel() > 900  # spread over the catalogue
