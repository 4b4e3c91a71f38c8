"""``gr_models.modules.silu_projection.linear_silu_split`` (the HSTU block's U/V/Q/K projection with a fused backward)
against the eager form, values and every gradient.

- CPU: the Triton kernel in the interpreter (``INTERPRET_ON_CPU``; 4-row programs in 2-row steps over 8 columns, so
  small shapes span several programs, steps, row and column tails, and pieces that straddle column blocks), fp32
  against a float64 reference with hypothesis shapes; strided piece gradients; bf16 autocast dtypes; the eager
  fallback; errors; Dynamo traces the eager form; the HSTU block with and without ``fused_projection``.
- GPU (``-m gpu``): the compiled kernel under bf16 autocast at the training step's shape.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gr_models.modules import silu_projection
from gr_models.modules.hstu import HSTUBlock
from gr_models.modules.silu_projection import eager_linear_silu_split, linear_silu_split, silu_split_backward
from tests.gr_models.block_parity import UNFUSED, assert_fused_block_equals_unfused
from tests.gr_models.triton_marks import needs_cuda, needs_triton


@pytest.fixture(autouse=True)
def interpret_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors through the kernel's interpreted copy (the CPU default is the eager form)."""
    monkeypatch.setattr(silu_projection, "INTERPRET_ON_CPU", True)


def _operands(n: int, k: int, sizes: tuple[int, ...], seed: int, device: str = "cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, k, generator=g, device=device).requires_grad_()
    w = (torch.randn(sum(sizes), k, generator=g, device=device) / k**0.5).requires_grad_()
    b = (0.5 * torch.randn(sum(sizes), generator=g, device=device)).requires_grad_()
    ups = [torch.randn(n, s, generator=g, device=device) for s in sizes]
    return x, w, b, ups


def _grads(outs, inputs, ups):
    return torch.autograd.grad([o for o in outs], inputs, [u.to(o.dtype) for o, u in zip(outs, ups, strict=True)])


@needs_triton
@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(0, 11),
    k=st.integers(1, 12),
    sizes=st.one_of(st.tuples(*[st.integers(1, 11)] * 4), st.tuples(*[st.sampled_from([8, 16])] * 4)),
    seed=st.integers(0, 2**16),
)
def test_interpreted_backward_matches_the_reference_fp32(n: int, k: int, sizes: tuple[int, ...], seed: int) -> None:
    x, w, b, ups = _operands(n, k, sizes, seed)
    outs = linear_silu_split(x, w, b, sizes)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    want = eager_linear_silu_split(*leaves, sizes)
    assert [tuple(o.shape) for o in outs] == [(n, s) for s in sizes]
    for o, r in zip(outs, want, strict=True):
        assert o.dtype == torch.float32
        torch.testing.assert_close(o.double(), r, atol=1e-5, rtol=1e-5)
    got = _grads(outs, [x, w, b], ups)
    ref = _grads(want, leaves, [u.double() for u in ups])
    for name, a, r in zip(("dx", "dweight", "dbias"), got, ref, strict=True):
        assert a.dtype == torch.float32 and a.shape == r.shape
        torch.testing.assert_close(a.double(), r, atol=1e-5 * max(n, 1), rtol=1e-5, msg=lambda m, n_=name: f"{n_}: {m}")


@needs_triton
@pytest.mark.parametrize("sizes", [(5, 3, 6, 4), (8, 16, 8, 24)], ids=["masked-columns", "one-piece-programs"])
def test_strided_piece_gradients(sizes: tuple[int, ...]) -> None:
    """The kernel reads each piece's gradient where it is: column slices of wider tensors (row stride != width);
    widths that the interpreter's 8-column blocks divide take the one-pointer-per-program path."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(9, sum(sizes), generator=g)
    wide = [torch.randn(9, s + 7, generator=g)[:, 2 : 2 + s] for s in sizes]
    dy, db = silu_split_backward(wide, y)
    s = torch.sigmoid(y)
    want = torch.cat(wide, dim=1) * s * (1 + y * (1 - s))
    torch.testing.assert_close(dy, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(db, want.sum(0), atol=1e-5, rtol=1e-5)


@needs_triton
def test_autocast_dtypes_and_values() -> None:
    """Under bf16 autocast the pieces are bf16 (as ``nn.Linear`` + SiLU would give) and the gradients come back in
    the leaves' dtypes; values as the eager form under the same autocast."""
    sizes = (4, 4, 6, 6)
    x, w, b, ups = _operands(13, 10, sizes, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = linear_silu_split(x, w, b, sizes)
        ref = eager_linear_silu_split(x, w, b, sizes)
    assert all(o.dtype == torch.bfloat16 for o in outs)
    for o, r in zip(outs, ref, strict=True):
        torch.testing.assert_close(o, r, atol=0, rtol=0)
    got, want = _grads(outs, [x, w, b], ups), _grads(ref, [x, w, b], ups)
    for a, r in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        assert (a - r).abs().max() <= 2e-2 * max(r.abs().max().item(), 1.0)


def test_off_the_kernel_device_it_is_the_eager_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(silu_projection, "INTERPRET_ON_CPU", False)
    sizes = (3, 3, 2, 2)
    x, w, b, ups = _operands(6, 5, sizes, 2)
    outs = linear_silu_split(x, w, b, sizes)
    assert all(o.grad_fn is not None and "LinearSiluSplit" not in type(o.grad_fn).__name__ for o in outs)
    ref = eager_linear_silu_split(x, w, b, sizes)
    for a, r in zip(_grads(outs, [x, w, b], ups), _grads(ref, [x, w, b], ups), strict=True):
        torch.testing.assert_close(a, r, atol=0, rtol=0)


def test_errors_name_the_problem() -> None:
    x, w, b, _ = _operands(4, 6, (2, 2, 2, 2), 0)
    with pytest.raises(ValueError, match="x \\[n, K\\] and weight \\[W, K\\]"):
        linear_silu_split(x[:, :5], w, b, (2, 2, 2, 2))
    with pytest.raises(ValueError, match="bias must be \\[8\\]"):
        linear_silu_split(x, w, b[:7], (2, 2, 2, 2))
    with pytest.raises(ValueError, match="four positive widths summing to 8"):
        linear_silu_split(x, w, b, (2, 2, 4))
    with pytest.raises(ValueError, match="four positive widths summing to 8"):
        linear_silu_split(x, w, b, (2, 2, 2, 3))


@needs_triton
def test_dynamo_traces_the_eager_form() -> None:
    sizes = (2, 2, 3, 3)
    x, w, b, _ = _operands(5, 4, sizes, 3)
    compiled = torch.compile(lambda *a: linear_silu_split(*a, sizes), backend="aot_eager", fullgraph=True)
    for a, r in zip(compiled(x, w, b), eager_linear_silu_split(x, w, b, sizes), strict=True):
        torch.testing.assert_close(a, r)


@needs_triton
def test_fused_block_equals_the_eager_block(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    kernel_backward = silu_projection.silu_split_backward
    monkeypatch.setattr(silu_projection, "silu_split_backward", lambda *a: calls.append(1) or kernel_backward(*a))
    assert_fused_block_equals_unfused(0, 0, 1e-5, 1e-6, fused_projection=True)
    assert len(calls) == 1  # the fused block's backward only


@pytest.mark.gpu
@needs_cuda
def test_compiled_kernel_under_autocast_is_close_to_the_eager_form() -> None:
    sizes = (512, 512, 512, 512)
    x, w, b, ups = _operands(8197, 512, sizes, 0, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outs = linear_silu_split(x, w, b, sizes)
        ref = eager_linear_silu_split(x, w, b, sizes)
    assert any("LinearSiluSplit" in type(o.grad_fn).__name__ for o in outs)
    for o, r in zip(outs, ref, strict=True):
        torch.testing.assert_close(o, r, atol=0, rtol=0)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    exact = _grads(eager_linear_silu_split(*leaves, sizes), leaves, [u.double() for u in ups])
    got, bf16 = _grads(outs, [x, w, b], ups), _grads(ref, [x, w, b], ups)
    for name, a, r, e in zip(("dx", "dweight", "dbias"), got, bf16, exact, strict=True):
        # at most 2x the eager bf16 form's error against float64 (floor: bf16 rounding of the largest value)
        floor = 2**-8 * e.abs().max().item()
        assert (a.double() - e).abs().max() <= 2 * max((r.double() - e).abs().max().item(), floor), name


@needs_triton
@pytest.mark.parametrize("one_piece", [True, False])
def test_kernel_compiles_for_sm90_with_16_byte_accesses(one_piece: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled for sm90 without a GPU (Triton ships ptxas) at the training shape's tile: what only the compiler sees
    (the scalar branch choosing a piece's pointer) builds, and every global load and store of the 16-bit tensors is
    16 bytes wide."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fn = silu_projection._KERNELS.compiled().silu_split_bwd_kernel
    if not isinstance(fn, triton.JITFunction):
        pytest.skip("the kernels module was imported under TRITON_INTERPRET=1 in this process")
    tiles = silu_projection._tiles([512] * 4, torch.device("cuda"))
    assert tiles["ONE_PIECE"] and tiles["BLOCK_N"] == 128
    constexprs = {k: v for k, v in tiles.items() if k != "num_warps"}
    constexprs.update(W=2048, C1=512, C2=1024, C3=1536, ONE_PIECE=one_piece)
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name == "db_part_ptr" else "*bf16"
        else:
            sig[name] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n.endswith("_ptr") or "stride" in n}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": tiles["num_warps"]}).asm["ptx"]
    loads = re.findall(r"ld\.global\S*", ptx)
    stores = re.findall(r"st\.global\S*", ptx)
    assert loads and all(op.endswith(".v4.b32") for op in loads), loads
    per_tensor = tiles["BLOCK_M"] * tiles["BLOCK_N"] // (32 * tiles["num_warps"] * 8)  # 16-byte loads per thread
    assert len(loads) == (2 if one_piece else 5) * per_tensor  # g (or the 4 masked g loads) and y, once per step
    assert stores.count("st.global.v4.b32") == per_tensor, stores  # dy; then the fp32 column sums, once


def test_where_nothing_is_fused_the_block_calls_its_projection_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off the kernels' device the block runs ``block.uvqk`` as a module, so its hooks run (e.g. a dtype probe)."""
    monkeypatch.setattr(silu_projection, "INTERPRET_ON_CPU", False)
    block = HSTUBlock(dataclasses.replace(UNFUSED, fused_projection=True))
    seen = []
    block.uvqk.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    block(torch.randn(10, 16), torch.tensor([0, 3, 8, 10]), 7, None)
    assert seen == [torch.Size([10, 64])]
