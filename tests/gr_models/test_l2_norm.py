"""``gr_models.modules.l2_norm.l2_normalize`` (``F.normalize(x, dim=-1)`` fused, the retrieval model's query and item
normalisation) against a float64 ``F.normalize``, values and gradients.

- CPU: the Triton kernels in the interpreter (``INTERPRET_ON_CPU``; 2-row programs, so small shapes span several
  programs and a row tail; hypothesis shapes, 3-D and row-strided inputs, zero rows and rows whose norm is below
  eps), fp32, fp16 and bf16; the op's PyTorch bodies; the ``F.normalize`` fallback (bit-equal); ``opcheck``; eager
  calls equal to the op; the op recorded under torch.compile; the retrieval model with and without the kernels.
- GPU (``-m gpu``): compiled kernels in bf16/fp32 at the training shape ``[65536, 512]`` against fp32 F.normalize.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import AotEagerAndRecordGraphs
from torchrec import KeyedJaggedTensor

from gr_models.data.batching import ITEM_FEATURE, SequenceBatch
from gr_models.modules import l2_norm
from gr_models.modules.hstu import HSTUConfig
from gr_models.modules.l2_norm import l2_normalize
from gr_models.retrieval.model import RetrievalModel, RetrievalModelConfig
from tests.gr_models.triton_marks import needs_cuda, needs_triton

OP_NAMES = {"gr_models::l2_normalize", "gr_models::l2_normalize_bwd"}


@pytest.fixture(autouse=True)
def interpret_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors through the kernels' interpreted copy (the CPU default is F.normalize)."""
    monkeypatch.setattr(l2_norm, "INTERPRET_ON_CPU", True)


def _input(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    seed: int,
    device: str = "cpu",
    strided: bool = False,
    eps: float = 1e-12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(leaf, x)``: rows of mixed scales, the first all zeros and the second with a norm below ``eps`` (when there
    are rows); ``strided``: ``x`` is a column slice of ``leaf`` (rows strided along dim 0)."""
    g = torch.Generator(device=device).manual_seed(seed)
    *lead, d = shape
    width = 3 * d if strided else d
    t = torch.randn(*lead, width, generator=g, device=device)
    t = t * torch.exp2(torch.randint(-6, 7, (*lead, 1), generator=g, device=device).float())
    rows = t.view(math.prod(lead), width)
    if rows.shape[0] > 0:
        rows[0] = 0
    if rows.shape[0] > 1:
        rows[1] *= 0.25 * eps / rows[1].norm().clamp_min(1e-30)
    leaf = t.to(dtype).requires_grad_()
    return leaf, leaf[..., d : 2 * d] if strided else leaf


def _check(
    shape: tuple[int, ...], dtype: torch.dtype, seed: int, *, rel: float, eps: float = 1e-12, device: str = "cpu",
    strided: bool = False,
) -> None:  # fmt: skip
    """Values and the gradient against float64 F.normalize of the same (rounded) values, row by row: ``y`` to ``rel``,
    ``dx`` to ``rel * max|dy| / max(||x||, eps)`` (its size before cancellation; ~1/eps for rows below eps)."""
    leaf, x = _input(shape, dtype, seed, device, strided, eps)
    assert l2_norm.runs_fused(x)
    y = l2_normalize(x, eps)
    ref_leaf = leaf.detach().double().requires_grad_()
    ref_x = ref_leaf[..., shape[-1] : 2 * shape[-1]] if strided else ref_leaf
    want = F.normalize(ref_x, p=2, dim=-1, eps=eps)
    assert y.dtype == dtype and y.shape == x.shape
    dy = torch.randn(shape, generator=torch.Generator(device=device).manual_seed(seed + 1), device=device).to(dtype)
    (got_dx,) = torch.autograd.grad(y, leaf, dy)
    (ref_dx,) = torch.autograd.grad(want, ref_leaf, dy.double())
    n = math.prod(shape[:-1])
    norms = ref_x.detach().reshape(n, shape[-1]).norm(dim=-1, keepdim=True)
    dx_scale = dy.double().reshape(n, shape[-1]).abs().amax(-1, keepdim=True) / norms.clamp_min(eps)
    for name, a, r, scale in (("y", y, want, 1.0), ("dx", got_dx, ref_dx, dx_scale)):  # dx: leaf rows
        a, r = a.double().reshape(n, a.shape[-1]), r.reshape(n, r.shape[-1])
        assert bool(((a - r).abs() <= rel * scale).all()), f"{name}: max error {(a - r).abs().max()}"
        assert a.isfinite().all(), name


@needs_triton
@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(0, 5), min_size=1, max_size=2),
    d=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    eps=st.sampled_from([1e-12, 1e-3, 0.5]),
    strided=st.booleans(),
)
def test_interpreted_kernels_match_f_normalize_fp32(
    lead: list[int], d: int, seed: int, eps: float, strided: bool
) -> None:
    _check((*lead, d), torch.float32, seed, rel=2e-6, eps=eps, strided=strided)


@needs_triton
@pytest.mark.parametrize(("dtype", "rel"), [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_interpreted_kernels_half_precision(dtype: torch.dtype, rel: float) -> None:
    # eps 1e-3: a zero row's gradient dy / eps stays finite in fp16 (dy / 1e-12 overflows, as in F.normalize)
    _check((7, 24), dtype, 3, rel=rel, eps=1e-3)
    _check((3, 3, 33), dtype, 4, rel=rel, eps=1e-3, strided=True)


@needs_triton
def test_op_bodies_without_the_kernels_match_f_normalize(monkeypatch: pytest.MonkeyPatch) -> None:
    """The op's PyTorch bodies (the op called where the kernels don't run)."""
    monkeypatch.setattr(l2_norm, "_kernels", lambda t: None)
    _check((5, 12), torch.float32, 1, rel=2e-6)
    _check((2, 3, 12), torch.float32, 2, rel=2e-6, eps=1e-3, strided=True)


def test_fallback_is_f_normalize_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU without INTERPRET_ON_CPU, other dtypes, D over MAX_D or D = 0: F.normalize itself, values and gradients."""
    cases = [(torch.float64, 16), (torch.float32, l2_norm.MAX_D + 1), (torch.float32, 0)]
    monkeypatch.setattr(l2_norm, "INTERPRET_ON_CPU", False)
    cases += [(torch.float32, 16), (torch.float16, 16)]
    for dtype, d in cases:
        leaf, x = _input((5, d), dtype, 0, strided=True)
        assert not l2_norm.runs_fused(x)
        dy = torch.randn(5, d).to(dtype)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = l2_normalize(x, 1e-3)
            (got_dx,) = torch.autograd.grad(got, leaf, dy)
        assert not OP_NAMES & {e.name for e in prof.events()}
        want = F.normalize(x, dim=-1, eps=1e-3)
        (want_dx,) = torch.autograd.grad(want, leaf, dy)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(got_dx, want_dx, rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least one dimension"):
        l2_normalize(torch.tensor(3.0))


@needs_triton
def test_opcheck() -> None:
    x = _input((6, 16), torch.float32, 0, strided=True, eps=1e-3)[1].detach().requires_grad_()
    torch.library.opcheck(l2_norm._l2_normalize_op, (x, 1e-3, torch.float32))
    y, norm = l2_norm._l2_normalize_op(x, 1e-3, torch.float32)
    dy = torch.randn(6, 16)
    args = (dy, y.detach(), norm.detach(), 1e-3, torch.float32)
    torch.library.opcheck(l2_norm._l2_normalize_bwd_op, args)  # no derivative
    torch.library.opcheck(l2_norm._l2_normalize_op, (torch.randn(0, 5), 1e-12, torch.float32))
    torch.library.opcheck(l2_norm._l2_normalize_op, (x, 1e-3, torch.bfloat16))  # y in another dtype than x


@needs_triton
@pytest.mark.parametrize("fused", [True, False])
def test_out_dtype_writes_y_in_it_and_the_gradient_in_x_dtype(monkeypatch: pytest.MonkeyPatch, fused: bool) -> None:
    """``out_dtype=bf16`` on fp32 rows (the retrieval loss's operands under autocast): y is F.normalize's within bf16
    rounding, and the fp32 gradient equals the one through ``F.normalize(x).to(bf16)`` up to the bf16 y the backward
    reads (the kernels, and the F.normalize fallback)."""
    monkeypatch.setattr(l2_norm, "INTERPRET_ON_CPU", fused)
    leaf, x = _input((9, 24), torch.float32, 3, strided=True, eps=1e-3)
    y = l2_normalize(x, 1e-3, out_dtype=torch.bfloat16)
    want = F.normalize(x, dim=-1, eps=1e-3)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    torch.testing.assert_close(y.float(), want, rtol=2**-7, atol=1e-7)  # a bf16 ulp (the interpreter may truncate)
    dy = torch.randn(9, 24).to(torch.bfloat16)
    (dx,) = torch.autograd.grad(y, leaf, dy)
    (want_dx,) = torch.autograd.grad(want, leaf, dy.float())
    assert dx.dtype == torch.float32
    scale = dy.float().abs().amax() / x.detach().norm(dim=-1).clamp_min(1e-3).min()
    assert (dx - want_dx).abs().max() <= 1e-2 * scale
    same = l2_normalize(x, 1e-3, out_dtype=torch.float32)
    torch.testing.assert_close(same, want, rtol=1e-6, atol=1e-6)  # the input's own dtype: the plain op
    with pytest.raises(ValueError, match="floating-point"):
        l2_normalize(x, out_dtype=torch.int32)


@needs_triton
def test_eager_calls_skip_the_op_dispatch_and_equal_it() -> None:
    """Eager ``l2_normalize`` runs ``EagerL2Normalize`` (no torch.library dispatch) under the op's profiler names,
    with the op's values and gradients bit for bit."""
    leaf, x = _input((7, 20), torch.float32, 5, strided=True)
    dy = torch.randn(7, 20)

    def run(fn) -> tuple[torch.Tensor, torch.Tensor]:
        y = fn()
        return y.detach(), torch.autograd.grad(y, leaf, dy)[0]

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        eager = run(lambda: l2_normalize(x))
    names = {e.name for e in prof.events()}
    assert names >= OP_NAMES
    assert not any(n.startswith("GeneratedBackwardFor_gr_models") for n in names)
    through_the_op = run(lambda: l2_norm._l2_normalize_op(x, 1e-12, torch.float32)[0])
    for a, c in zip(eager, through_the_op, strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


@needs_triton
@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd:UserWarning")
def test_torch_compile_records_the_op() -> None:
    """Dynamo (fullgraph) traces through the fake impls: the forward graph holds the op, the backward graph its
    backward op; values and gradients equal the eager call's bit for bit."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        return l2_normalize(x * 2.0, 1e-3)

    leaf, x = _input((3, 3, 10), torch.float32, 7, strided=True, eps=1e-3)
    dy = torch.randn(3, 3, 10)
    torch._dynamo.reset()
    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    results = []
    for f in (fn, compiled):
        y = f(x)
        results.append((y.detach(), torch.autograd.grad(y, leaf, dy)[0]))
    torch._dynamo.reset()
    forward_code = "\n".join(g.code for g in backend.fw_graphs)
    backward_code = "\n".join(g.code for g in backend.bw_graphs)
    assert "gr_models.l2_normalize.default" in forward_code
    assert "gr_models.l2_normalize_bwd.default" in backward_code
    for a, c in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(c, a, rtol=0, atol=0)


def _model_and_batch() -> tuple[RetrievalModel, SequenceBatch]:
    torch.manual_seed(0)
    cfg = RetrievalModelConfig(
        num_items=30, embedding_dim=8, max_seq_len=6, dropout=0.0,
        hstu=HSTUConfig(num_blocks=1, num_heads=2, num_time_buckets=8, attention_backend="reference"),
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([3, 5, 1])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    ts = torch.arange(9, dtype=torch.int64) * 7 + 1_600_000_000
    batch = SequenceBatch(
        user_ids=torch.arange(3),
        features=KeyedJaggedTensor.from_lengths_sync(
            keys=[ITEM_FEATURE], values=torch.randint(30, (9,), generator=g), lengths=lengths
        ),
        timestamps=ts,
        seq_offsets=offsets,
        max_seq_len=5,
        target_items=torch.randint(30, (9,), generator=g),
        target_timestamps=ts + 3,
    )
    return RetrievalModel(cfg), batch


@needs_triton
def test_retrieval_model_with_the_kernels_equals_f_normalize(monkeypatch: pytest.MonkeyPatch) -> None:
    """``training_forward`` (queries, targets, ``[N, K, D]`` negatives) and ``item_embeddings``: the same values and
    gradients through the interpreted kernels as through F.normalize."""
    model, batch = _model_and_batch()
    negatives = torch.randint(30, (9, 2), generator=torch.Generator().manual_seed(2))
    results = []
    for fused in (False, True):
        monkeypatch.setattr(l2_norm, "INTERPRET_ON_CPU", fused)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            emb = model.training_forward(batch, negatives=negatives)
            items = model.item_embeddings(negatives)
            loss = sum((t * torch.linspace(-1, 1, t.numel()).view_as(t)).sum() for t in (*emb, items))
            grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        assert ({e.name for e in prof.events()} >= OP_NAMES) == fused
        results.append((*emb, items, *(g for g in grads if g is not None)))
    for a, r in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_kernels_match_f_normalize(dtype: torch.dtype) -> None:
    """The training shape, against F.normalize in fp32 of the same values (float64 in _check's smaller cases)."""
    rel = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(65536, 512, generator=g, device="cuda").to(dtype).requires_grad_()
    dy = torch.randn(65536, 512, generator=g, device="cuda").to(dtype)
    y = l2_normalize(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    xf = x.detach().float().requires_grad_()
    want = F.normalize(xf, dim=-1)
    (want_dx,) = torch.autograd.grad(want, xf, dy.float())
    assert y.dtype == dx.dtype == dtype
    torch.testing.assert_close(y.float(), want, rtol=0, atol=rel)
    assert (dx.float() - want_dx).abs().max() <= rel * want_dx.abs().max()
    _check((4099, 512), dtype, 1, rel=rel, device="cuda")
    _check((33, 7, 100), dtype, 2, rel=rel, eps=1e-3, device="cuda", strided=True)


@pytest.mark.gpu
@needs_cuda
def test_compiled_kernels_write_bf16_rows_of_fp32_input() -> None:
    """``out_dtype=bf16`` at the training shape: F.normalize's values rounded to bf16, an fp32 gradient."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(65536, 512, generator=g, device="cuda").requires_grad_()
    dy = torch.randn(65536, 512, generator=g, device="cuda").to(torch.bfloat16)
    y = l2_normalize(x, out_dtype=torch.bfloat16)
    (dx,) = torch.autograd.grad(y, x, dy)
    want = F.normalize(x, dim=-1)
    (want_dx,) = torch.autograd.grad(want, x, dy.float())
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.float32
    torch.testing.assert_close(y.float(), want, rtol=2**-8, atol=1e-7)
    assert (dx - want_dx).abs().max() <= 1.6e-2 * want_dx.abs().max()


@pytest.mark.gpu
@needs_cuda
def test_inductor_compiled_call_matches_eager() -> None:
    """Inductor around the op (an opaque node running the compiled kernels): the eager call's values and gradient."""
    x = torch.randn(1000, 512, device="cuda", requires_grad=True)
    dy = torch.randn(1000, 512, device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: l2_normalize(t * 2.0), fullgraph=True)
    results = []
    for f in (lambda t: l2_normalize(t * 2.0), compiled):
        y = f(x)
        results.append((y, torch.autograd.grad(y, x, dy)[0]))
    torch._dynamo.reset()
    for a, c in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(c, a)
