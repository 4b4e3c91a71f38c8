"""The native "cutlass" backend: registration and fallback everywhere; forward parity on an sm90 GPU.

Forward tests run twice on sm90: through the Hopper kernel (WGMMA/TMA) and through the SM80-MMA kernel, chosen with
GR_KERNELS_FWD_KERNEL=sm90|sm80, which the native dispatch reads on every call.

Parity criterion (the kernels issue): the kernel's max-abs error against an fp32 reference may be at most 2x the
error of the same computation done by the PyTorch reference in the kernel's dtype, plus a floor of one unit of the
output dtype at the largest exact value (``rounding_floor``): the final fp32 -> bf16/fp16 store alone may cost that,
and on tiny problems (one token, one head) the reference can land within 1e-6 of exact by luck.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gr_kernels
from gr_kernels import AttentionCall, HSTUParams, hstu_attention
from gr_kernels.backends import _LOGGED_SKIPS, resolve_backend
from gr_kernels.cutlass_backend import native_available
from tests.gr_kernels.native_cases import MASK_FAMILIES, needs_sm90, rounding_floor


def _call(device: str, dtype: torch.dtype = torch.bfloat16, dim: int = 64, dropout: float = 0.0) -> AttentionCall:
    params = HSTUParams(8, 1.0, 8, dropout_p=dropout)
    return AttentionCall(params, torch.device(device), dtype, 2, dim, dim, torch.int64, False, 0, False)


@pytest.mark.skipif(
    shutil.which("nvcc") is None or os.environ.get("GR_KERNELS_CUDA", "auto").lower() == "off",
    reason="no nvcc on this machine (or GR_KERNELS_CUDA=off): the install is pure Python by design",
)
def test_install_compiled_the_cuda_kernels() -> None:
    # Where nvcc exists (CI's CPU machines included) the package build must have compiled the CUDA sources.
    assert native_available(), "nvcc is on PATH but gr_kernels._C is missing: the CUDA build was skipped or failed"
    from gr_kernels import _C

    assert "90a" in _C.compiled_archs().split(";")


@pytest.mark.skipif(not native_available(), reason="gr-kernels was installed without its CUDA kernels")
def test_sm90_forward_self_check() -> None:
    # Runs on the host (CPU CI too): the Hopper forward's tile schedule against the mask (visited key tiles cover
    # every visible pair, mask-free tiles hide none) and the fragment / shared-memory layout facts it relies on; the
    # backward's causal masks and where its head-dim-256 dQ fragments land in the Q / dO stage (kDqInStage).
    from gr_kernels import _C

    report = _C.sm90_fwd_self_check()
    if report is None:
        assert "90a" not in _C.compiled_archs().split(";")
        pytest.skip("this build has no sm90a kernels")
    assert report == "", report


def test_registered_ahead_of_the_reference() -> None:
    assert gr_kernels.available_backends()[:1] == ["cutlass"]
    assert gr_kernels.available_backends()[-1] == "reference"


def test_cpu_inputs_fall_back_with_a_reason(caplog: pytest.LogCaptureFixture) -> None:
    reason = gr_kernels.get_backend("cutlass").supports(_call("cpu"))
    assert reason is not None
    assert ("CUDA kernels" in reason) or ("not CUDA" in reason)
    _LOGGED_SKIPS.discard(("cutlass", reason))
    with caplog.at_level(logging.INFO, logger="gr_kernels"):
        assert resolve_backend("auto", _call("cpu")) == "reference"
    assert any("'cutlass' not used" in r.getMessage() for r in caplog.records)


def test_backward_without_a_native_kernel_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    # Delta q at head dim 256 has no native backward in any build (the Hopper backward has no delta q, the SM80 one
    # no head dim 256): it runs the reference, and the registry's log says so once.
    k = torch.randn(4, 1, 256, dtype=torch.float64)
    q = k[2:].clone()
    offsets, q_offsets = torch.tensor([0, 4]), torch.tensor([0, 2])
    params = HSTUParams(4, 0.5, 4, max_q_len=2)
    expected = gr_kernels.reference.reference_backward(q, q, k, k, offsets, None, None, params, q_offsets)
    reason = (
        "no native backward for head dim 256 with delta q (native: 64, 128); that backward runs the PyTorch reference"
    )
    _LOGGED_SKIPS.discard(("cutlass", reason))
    with caplog.at_level(logging.INFO, logger="gr_kernels"):
        for _ in range(2):
            got = gr_kernels.get_backend("cutlass").backward(q, q, k, k, offsets, None, None, params, q_offsets)
            assert all(torch.equal(a, b) for a, b in zip(got[:3], expected[:3], strict=True))
    assert [r.getMessage() for r in caplog.records] == [f"hstu_attention: backend 'cutlass' not used: {reason}"]


def test_native_backward_head_dims_follow_the_build() -> None:
    from gr_kernels.cutlass_backend import _C, native_backward_head_dims

    has_sm90 = _C is not None and "90a" in _C.compiled_archs().split(";")
    assert native_backward_head_dims() == ((64, 128, 256) if has_sm90 else (64, 128))
    assert native_backward_head_dims(delta_q=True) == (64, 128)


def test_forcing_it_on_cpu_is_a_clear_error() -> None:
    q = torch.randn(3, 1, 64)
    with pytest.raises(ValueError, match="backend 'cutlass' cannot run this call"):
        hstu_attention(q, q, q, torch.tensor([0, 3]), 3, alpha=1.0, backend="cutlass")


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("dtype", "dim", "reason"),
    [
        (torch.float32, 64, "dtype"),
        (torch.bfloat16, 96, "head dims"),
        (torch.bfloat16, 64, "dropout"),
    ],
)
def test_unsupported_calls_name_the_reason(dtype: torch.dtype, dim: int, reason: str) -> None:
    dropout = 0.1 if reason == "dropout" else 0.0
    msg = gr_kernels.get_backend("cutlass").supports(_call("cuda", dtype, dim, dropout))
    assert msg is not None and reason in msg


# ----------------------------------------------------------------------------------------------------- GPU parity
def _on_grid(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to ``dtype``'s values, kept in fp32: the exact reference then computes on the very inputs the
    kernel and the low-precision reference get, so both errors are their computation's alone. (On unrounded fp32
    inputs the rounding of the inputs counts as error too; in a one-token case the fp16 reference's own roundings
    can cancel it by chance, and the 5x bound then fell under an error the kernel cannot avoid.)"""
    return t.to(dtype).float()


def _inputs(lengths, heads, dim, dtype, seed, rab_heads, num_targets, max_seq_len=None):
    gen = torch.Generator().manual_seed(seed)
    n = max_seq_len or max([*lengths, 1])
    total = sum(lengths)
    q, k, v = (_on_grid(torch.randn(total, heads, dim, generator=gen), dtype) for _ in range(3))
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    rab = _on_grid(torch.randn(len(lengths), rab_heads, n, n, generator=gen), dtype) if rab_heads else None
    targets = None
    if num_targets:
        targets = torch.tensor([min(num_targets, max(length - 1, 0)) for length in lengths], dtype=torch.int64)
    dev = "cuda"
    cast = [t.to(dev, dtype) for t in (q, k, v)]
    return (
        cast,
        [t.to(dev) for t in (q, k, v)],
        offsets.to(dev),
        n,
        None if rab is None else rab.to(dev),
        None if targets is None else targets.to(dev),
    )


def _check_forward(
    lengths, heads, dim, dtype, *, seed=0, rab_heads=0, num_targets=0, max_seq_len=None, factor=2.0, **kw
):
    (q, k, v), (q32, k32, v32), offsets, n, rab, targets = _inputs(
        lengths, heads, dim, dtype, seed, rab_heads, num_targets, max_seq_len
    )
    alpha = kw.pop("alpha", 1.0 / dim**0.5)
    common = dict(alpha=alpha, num_targets=targets, **kw)
    out = hstu_attention(q, k, v, offsets, n, rab=None if rab is None else rab.to(dtype), backend="cutlass", **common)
    ref_low = hstu_attention(
        q, k, v, offsets, n, rab=None if rab is None else rab.to(dtype), backend="reference", **common
    )
    exact = hstu_attention(q32, k32, v32, offsets, n, rab=rab, backend="reference", **common)
    assert out.shape == exact.shape and out.dtype == dtype
    if exact.numel() == 0:  # only empty sequences: nothing to compare
        return
    err = (out.float() - exact).abs().max().item()
    ref_err = (ref_low.float() - exact).abs().max().item()
    assert err <= factor * ref_err + rounding_floor(exact, dtype), (
        f"kernel error {err:.3e} > {factor} x reference-{dtype} error {ref_err:.3e}"
    )


MASKS = MASK_FAMILIES


@contextlib.contextmanager
def _forward_kernel(name: str) -> Iterator[None]:
    """Route native forwards to the Hopper ("sm90") or the SM80-MMA ("sm80") kernel inside the block."""
    before = os.environ.get("GR_KERNELS_FWD_KERNEL")
    os.environ["GR_KERNELS_FWD_KERNEL"] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("GR_KERNELS_FWD_KERNEL", None)
        else:
            os.environ["GR_KERNELS_FWD_KERNEL"] = before


@pytest.fixture(params=["sm90", "sm80"])
def fwd_kernel(request: pytest.FixtureRequest) -> Iterator[str]:
    with _forward_kernel(request.param):
        yield request.param


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize("rab_heads", [0, 1, 2])
def test_forward_masks_and_rab(mask: str, rab_heads: int, fwd_kernel: str) -> None:
    _check_forward([0, 1, 130, 77, 200], 2, 64, torch.bfloat16, rab_heads=rab_heads, **MASKS[mask])


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_forward_dtypes_and_head_dims(dtype: torch.dtype, dim: int, fwd_kernel: str) -> None:
    _check_forward([1, 65, 300, 129], 2, dim, dtype, rab_heads=1, num_targets=4, max_seq_len=333)


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("mask", ["causal", "context_targets_window", "full"])
def test_forward_long_sequences(dim: int, mask: str, fwd_kernel: str) -> None:
    # Many key tiles per query tile (the K/V pipelines wrap around several times), an odd max_seq_len (rab rows of
    # odd length: 16-bit bias loads), a sequence ending mid-tile right before the tensor end (TMA zero fill).
    _check_forward([1000, 0, 517, 2049], 2, dim, torch.bfloat16, rab_heads=2, max_seq_len=2051, **MASKS[mask])


@contextlib.contextmanager
def _rab_tma(enabled: bool) -> Iterator[None]:
    """Let the Hopper forward read an aligned rab through TMA (default) or force its per-thread global loads."""
    before = os.environ.get("GR_KERNELS_FWD_RAB_TMA")
    os.environ["GR_KERNELS_FWD_RAB_TMA"] = "1" if enabled else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("GR_KERNELS_FWD_RAB_TMA", None)
        else:
            os.environ["GR_KERNELS_FWD_RAB_TMA"] = before


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("mask", ["causal", "context_targets_window", "full"])
@pytest.mark.parametrize("rab_heads", [1, 2])
def test_forward_rab_through_tma(dim: int, mask: str, rab_heads: int) -> None:
    # max_seq_len a multiple of 8 (16-byte rab rows): the Hopper forward loads rab tiles with TMA next to each K
    # tile. Many key tiles (the rab stages wrap around), a sequence ending mid-tile, rows past max_seq_len (TMA zero
    # fill). Same math as the per-thread-load fallback, so the two paths must agree bit for bit.
    lengths, n = [1000, 0, 517, 2050], 2056
    with _forward_kernel("sm90"), _rab_tma(True):
        _check_forward(lengths, 2, dim, torch.bfloat16, rab_heads=rab_heads, max_seq_len=n, **MASKS[mask])
    kw = dict(MASKS[mask])
    (q, k, v), _, offsets, _, rab, targets = _inputs(
        lengths, 2, dim, torch.bfloat16, 0, rab_heads, kw.pop("num_targets", 0), n
    )
    kw.update(alpha=dim**-0.5, num_targets=targets, rab=rab.to(torch.bfloat16), backend="cutlass")
    outs = []
    for tma in (True, False):
        with _forward_kernel("sm90"), _rab_tma(tma):
            outs.append(hstu_attention(q, k, v, offsets, n, **kw))
    assert torch.equal(outs[0], outs[1]), (outs[0].float() - outs[1].float()).abs().max().item()


@needs_sm90
@pytest.mark.gpu
def test_forward_strided_inputs_and_graph_capture(fwd_kernel: str) -> None:
    # q/k/v as views of one fused projection (the HSTU block's layout: TMA reads them in place), captured in a CUDA
    # graph (the Hopper kernel builds its TMA descriptors on the host at launch: nothing to sync).
    total, heads, dim = 250, 2, 64
    fused = torch.randn(total, 3 * heads * dim, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.view(total, heads, dim) for t in fused.split(heads * dim, dim=1))
    offsets = torch.tensor([0, 100, 250], device="cuda")
    ref = hstu_attention(q, k, v, offsets, 150, alpha=0.2, backend="reference")
    out = hstu_attention(q, k, v, offsets, 150, alpha=0.2, backend="cutlass")
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # validate=False: value checks read offsets on the host, which capture forbids
        captured = hstu_attention(q, k, v, offsets, 150, alpha=0.2, backend="cutlass", validate=False)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, out, atol=0, rtol=0)


def _draw_call(data: st.DataObject) -> tuple[int, torch.dtype, dict]:
    """Heads, dtype and the keyword arguments (seed, rab, alpha, masks) of one hypothesis-drawn parity case."""
    heads = data.draw(st.integers(1, 3))
    dtype = data.draw(st.sampled_from([torch.bfloat16, torch.float16]))
    kw = {
        "seed": data.draw(st.integers(0, 1000)),
        "rab_heads": data.draw(st.sampled_from([0, 1])),
        "alpha": data.draw(st.sampled_from([1.0, 0.1])),
        "causal": data.draw(st.booleans()),
        "max_attn_len": data.draw(st.sampled_from([0, 0, 1, 16, 100])),
        "contextual_seq_len": data.draw(st.sampled_from([0, 0, 1, 4])),
        "num_targets": data.draw(st.sampled_from([0, 0, 1, 5])),
        "target_group_size": data.draw(st.sampled_from([1, 2])),
    }
    return heads, dtype, kw


@needs_sm90
@pytest.mark.gpu
@settings(max_examples=30, deadline=None, database=None)
@given(data=st.data())
def test_forward_hypothesis(data: st.DataObject) -> None:
    lengths = data.draw(st.lists(st.integers(0, 300), min_size=1, max_size=6))
    dim = data.draw(st.sampled_from([64, 128, 256]))
    kernel = data.draw(st.sampled_from(["sm90", "sm80"]))
    heads, dtype, kw = _draw_call(data)
    with _forward_kernel(kernel):
        _check_forward(lengths, heads, dim, dtype, **kw)


def _backward_case(lengths, heads, dim, dtype, *, seed=0, rab_heads=0, num_targets=0, max_seq_len=None, **kw):
    """``grads(backend, low_precision)``: dq, dk, dv (and drab) of one backward case, plus the fp32 exact ones."""
    (q, k, v), (q32, k32, v32), offsets, n, rab, targets = _inputs(
        lengths, heads, dim, dtype, seed, rab_heads, num_targets, max_seq_len
    )
    alpha = kw.pop("alpha", 1.0 / dim**0.5)
    grad = _on_grid(torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)), dtype).to(q.device)

    def grads(backend: str, low: bool = True) -> list[torch.Tensor]:
        tensors, bias, g = ([q, k, v], None if rab is None else rab.to(dtype), grad.to(dtype)) if low else (
            [q32, k32, v32], rab, grad)  # fmt: skip
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        b = None if bias is None else bias.detach().clone().requires_grad_()
        out = hstu_attention(*leaves, offsets, n, alpha=alpha, num_targets=targets, rab=b, backend=backend, **kw)
        out.backward(g)
        return [t.grad for t in leaves] + ([] if b is None else [b.grad])

    return grads


def _check_backward(lengths, heads, dim, dtype, factor=5.0, **kw):
    """dq, dk, dv (and drab) of the kernel vs an fp32 reference: error <= ``factor`` x the reference's own error in
    ``dtype`` (plus one ulp at the largest gradient)."""
    grads = _backward_case(lengths, heads, dim, dtype, **kw)
    _assert_backward_parity(grads("cutlass"), grads("reference"), grads("reference", low=False), dtype, factor)


def _assert_backward_parity(got, ref_low, exact, dtype: torch.dtype, factor: float = 5.0) -> None:
    for name, g_, r_, e_ in zip(["dq", "dk", "dv", "drab"], got, ref_low, exact, strict=False):
        assert g_.dtype == r_.dtype and g_.shape == e_.shape, name
        if e_.numel() == 0:
            continue
        err = (g_.float() - e_).abs().max().item()
        ref_err = (r_.float() - e_).abs().max().item()
        assert err <= factor * ref_err + rounding_floor(e_, dtype), (
            f"{name}: kernel error {err:.3e} > {factor} x reference-{dtype} error {ref_err:.3e} (max |exact| "
            f"{e_.abs().max().item():.3e})"
        )


@contextlib.contextmanager
def _backward_kernel(name: str) -> Iterator[None]:
    """Route native backwards at head dims 64/128 to the Hopper ("sm90") or SM80-MMA ("sm80") kernel inside the
    block (head dim 256 has only the Hopper one)."""
    before = os.environ.get("GR_KERNELS_BWD_KERNEL")
    os.environ["GR_KERNELS_BWD_KERNEL"] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("GR_KERNELS_BWD_KERNEL", None)
        else:
            os.environ["GR_KERNELS_BWD_KERNEL"] = before


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize("rab_heads", [0, 1, 2])
def test_backward_masks_and_rab(mask: str, rab_heads: int) -> None:
    _check_backward([0, 1, 130, 77, 200], 2, 64, torch.bfloat16, rab_heads=rab_heads, **MASKS[mask])


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_backward_dtypes_and_head_dims(dtype: torch.dtype, dim: int) -> None:
    _check_backward([1, 65, 300, 129], 2, dim, dtype, rab_heads=1, num_targets=4, max_seq_len=333)


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("mask", ["causal", "context_targets_window", "full"])
@pytest.mark.parametrize("rab_heads", [0, 2])
def test_backward_long_sequences(dim: int, mask: str, rab_heads: int) -> None:
    # Many key and query tiles per sequence: the mask-free interior tiles and the pipeline wrap-around.
    _check_backward([700, 1, 1030, 257], 2, dim, torch.bfloat16, rab_heads=rab_heads, max_seq_len=1031, **MASKS[mask])


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("mask", ["causal", "targets_groups", "window_full", "context_targets_window"])
def test_backward_kernels_agree(dim: int, mask: str) -> None:
    # GR_KERNELS_BWD_KERNEL=sm90 and =sm80 give the same gradients within the parity bound.
    grads = _backward_case([3, 64, 200, 129, 0], 2, dim, torch.bfloat16, rab_heads=1, seed=3, **MASKS[mask])
    with _backward_kernel("sm90"):
        hopper = grads("cutlass")
    with _backward_kernel("sm80"):
        sm80 = grads("cutlass")
    ref_low, exact = grads("reference"), grads("reference", low=False)
    for name, a, b, r_, e_ in zip(["dq", "dk", "dv", "drab"], hopper, sm80, ref_low, exact, strict=True):
        diff = (a.float() - b.float()).abs().max().item()
        bound = 5 * (r_.float() - e_).abs().max().item() + rounding_floor(e_, torch.bfloat16)
        assert diff <= bound, f"{name}: sm90 and sm80 backwards differ by {diff:.3e} > {bound:.3e}"


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize(("n", "offset"), [(136, 0), (136, 1), (133, 0)])
def test_backward_bias_rows_pick_the_kernel(dim: int, n: int, offset: int) -> None:
    # A Hopper bias backward that loads the bias through TMA (head dims 64 and 128 unless built with
    # -D GR_HSTU_BWD_HDIM128_RS_RAB=0): rows of a multiple of 8 elements run it, others (133) the SM80 kernel; the
    # other head dims read the bias per thread either way. A bias view starting 2 bytes into its storage (offset 1:
    # contiguous, misaligned) reaches the kernels as an aligned copy. All within the parity bound.
    from gr_kernels.cutlass_backend import _C, _kernel_bias

    assert _C.hstu_bwd_runs_sm90(dim, False, True)
    assert _C.hstu_bwd_rab_via_tma(64)
    assert _C.hstu_bwd_runs_sm90(dim, False, False) == (not _C.hstu_bwd_rab_via_tma(dim))
    (q, k, v), (q32, k32, v32), offsets, n, rab, _ = _inputs([70, 129, 3], 2, dim, torch.bfloat16, 7, 1, 0, n)
    storage = torch.zeros(offset + rab.numel(), device="cuda", dtype=torch.bfloat16)
    bias = storage[offset:].view(rab.shape).copy_(rab)
    assert _kernel_bias(bias, torch.bfloat16).data_ptr() % 16 == 0
    grad = _on_grid(torch.randn(q.shape, generator=torch.Generator().manual_seed(2)), torch.bfloat16).to(q.device)

    def grads(tensors, b, g, backend):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        b = b.detach().requires_grad_()  # a view keeps its storage offset
        out = hstu_attention(*leaves, offsets, n, alpha=dim**-0.5, rab=b, backend=backend)
        out.backward(g)
        return [t.grad for t in leaves] + [b.grad]

    got = grads([q, k, v], bias, grad.to(q.dtype), "cutlass")
    ref_low = grads([q, k, v], rab.to(torch.bfloat16), grad.to(q.dtype), "reference")
    exact = grads([q32, k32, v32], rab, grad, "reference")
    _assert_backward_parity(got, ref_low, exact, torch.bfloat16)


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["sm90", "sm80"])
@pytest.mark.parametrize("n", [200, 333])
@pytest.mark.parametrize("dim", [64, 256])
def test_backward_drab_buffer_follows_the_kernel(kernel: str, n: int, dim: int) -> None:
    # The Hopper backward writes 16-bit dX tiles into rows padded to 16 bytes (n = 333: padded, sliced back off); the
    # SM80-MMA one (and any delta-q call) accumulates fp32 into a zeroed buffer. Either way drab comes back contiguous
    # in rab's shape. Head dim 64 loads the bias through TMA: rows of 333 elements are not 16-byte aligned, so that
    # call takes the SM80 kernel whatever the switch says (head dim 256, which has only the Hopper kernel, loads the
    # bias per thread).
    from gr_kernels.cutlass_backend import _drab_buffers

    if dim == 256 and kernel == "sm80":
        pytest.skip("head dim 256 has only the Hopper backward")
    q = torch.zeros(4, 2, dim, device="cuda", dtype=torch.bfloat16)
    rab = torch.zeros(3, 1, n, n, device="cuda", dtype=torch.bfloat16)
    with _backward_kernel(kernel):
        accum, rows = _drab_buffers(rab, q, delta_q=False)
        delta_accum, delta_rows = _drab_buffers(rab, q, delta_q=True)
        drab = _backward_case([n, 5, 70], 2, dim, torch.bfloat16, rab_heads=1, max_seq_len=n)("cutlass")[3]
    assert delta_rows is None and delta_accum is not None and delta_accum.dtype == torch.float32
    if kernel == "sm90" and (n % 8 == 0 or dim == 256):
        assert accum is None and rows is not None and rows.dtype == torch.bfloat16
        assert rows.shape == (3, 1, n, -(-n // 8) * 8)
    else:
        assert rows is None and accum is not None and accum.dtype == torch.float32 and accum.shape == rab.shape
        assert accum.count_nonzero() == 0
    assert drab.is_contiguous() and drab.shape == rab.shape and drab.dtype == torch.bfloat16
    assert drab.abs().sum() > 0


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("rab_heads", [1, 2])
@pytest.mark.parametrize("mask", ["causal", "window", "window_full", "context_targets_window"])
def test_backward_writes_every_drab_element(
    monkeypatch: pytest.MonkeyPatch, dim: int, rab_heads: int, mask: str
) -> None:
    # The Hopper backward takes its 16-bit drab unzeroed: the CTAs that own a plane's key columns (per-head planes:
    # all; a plane the heads share: the first head's CTA to start) store their dX tiles, the other heads add theirs
    # after the owner's stores, and the rows no tile covers get zeros. Poisoned with NaN, the buffer must come back all
    # written: sequences of 0 and 1 tokens, max_seq_len past every length (key tiles no sequence reaches) and a last
    # key tile of 8 columns (264).
    from gr_kernels import cutlass_backend

    fill_drab = cutlass_backend._drab_buffers
    poisoned = []

    def nan_drab_buffers(*args, **kwargs):
        accum, rows = fill_drab(*args, **kwargs)
        if rows is not None:
            poisoned.append(rows.fill_(float("nan")))
        return accum, rows

    monkeypatch.setattr(cutlass_backend, "_drab_buffers", nan_drab_buffers)
    with _backward_kernel("sm90"):
        _check_backward(
            [0, 1, 130, 77, 200, 0], 2, dim, torch.bfloat16, rab_heads=rab_heads, max_seq_len=264, **MASKS[mask]
        )
    assert poisoned, "the Hopper backward did not run"


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["sm90", "sm80"])
@pytest.mark.parametrize("dim", [64, 128])
def test_backward_with_a_frozen_bias_skips_drab(kernel: str, dim: int) -> None:
    # A bias that needs no gradient is still read, but the kernel gets no drab buffer: dk and dv are those of the
    # trainable-bias run bit for bit (each written once), dq equal up to the order of its fp32 atomic adds.
    # max_seq_len 336: bias rows of 16-byte multiples, which the Hopper kernels load through TMA.
    (q, k, v), _, offsets, n, rab, targets = _inputs([1, 65, 300, 129], 2, dim, torch.bfloat16, 0, 1, 4, 336)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.device, q.dtype)

    def run(trainable: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        bias = rab.to(torch.bfloat16).requires_grad_(trainable)
        out = hstu_attention(*leaves, offsets, n, alpha=0.125, num_targets=targets, rab=bias, backend="cutlass")
        out.backward(grad)
        return [t.grad for t in leaves], bias.grad

    with _backward_kernel(kernel):
        (dq, dk, dv), drab = run(True)
        (dq_frozen, dk_frozen, dv_frozen), no_drab = run(False)
    assert drab is not None and drab.abs().sum() > 0 and no_drab is None
    assert torch.equal(dk, dk_frozen) and torch.equal(dv, dv_frozen)
    torch.testing.assert_close(dq_frozen, dq, rtol=0, atol=rounding_floor(dq.float(), torch.bfloat16))


@needs_sm90
@pytest.mark.gpu
@settings(max_examples=30, deadline=None, database=None)
@given(data=st.data())
def test_backward_hypothesis(data: st.DataObject) -> None:
    lengths = data.draw(st.lists(st.integers(0, 260), min_size=1, max_size=5))
    dim = data.draw(st.sampled_from([64, 128, 256]))
    heads, dtype, kw = _draw_call(data)
    _check_backward(lengths, heads, dim, dtype, **kw)


@needs_sm90
@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["sm90", "sm80"])
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_fp16_parity_at_large_scores(kernel: str, dim: int) -> None:
    # alpha 1 on unit-variance q / k: scores of several sqrt(dim), where sigmoid(z) is near 0 and tanh.approx's
    # absolute error would be several fp16 ulps of P and dX (hypothesis found lengths [0, 1], head dim 64, 1 head);
    # fp16 kernels take an exact sigmoid (kExactSigmoid in hstu/utils.cuh), so they, fp32 inside, are at least as
    # accurate as PyTorch's fp16 computation (factor 1; with tanh.approx dq was 2.9x the reference's error in the
    # first case). sm80 at head dim 256: the Hopper backward.
    with _forward_kernel(kernel), _backward_kernel(kernel):
        for lengths in ([0, 1], [3, 77, 130, 1]):
            kw = dict(rab_heads=1, alpha=1.0, causal=False, seed=0, factor=1.0)
            _check_forward(lengths, 1, dim, torch.float16, **kw)
            _check_backward(lengths, 1, dim, torch.float16, **kw)


@needs_sm90
@pytest.mark.gpu
def test_torch_compile_runs_the_native_kernels() -> None:
    (q, k, v), _, offsets, n, rab, _ = _inputs([3, 70, 129], 2, 64, torch.bfloat16, 5, 1, 0)
    rab = rab.to(torch.bfloat16)

    def step(q, k, v, rab):
        return hstu_attention(q, k, v, offsets, n, alpha=0.125, rab=rab, backend="cutlass", validate=False)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, rab)]
        out = fn(*leaves)
        out.float().square().sum().backward()
        results.append([out, *(t.grad for t in leaves)])
    torch.testing.assert_close(results[1][0], results[0][0], atol=0, rtol=0)  # same kernel, same inputs
    for eager, compiled in zip(results[0][1:], results[1][1:], strict=True):  # dq/drab sum with atomics: order varies
        torch.testing.assert_close(compiled, eager, atol=2e-2, rtol=2e-2)
