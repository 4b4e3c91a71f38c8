"""The "triton" backend: registration and reasons everywhere; parity in Triton's interpreter on CPU; parity on GPU.

Parity rule (the kernels issue, as for the native backend): the kernel's max-abs error against a higher-precision
reference may be at most 2x (forward) / 5x (gradients) the error of the PyTorch reference run in the kernel's dtype,
plus one unit of the output dtype at the largest exact value (``rounding_floor``).

- CPU (interpreter, needs only ``pip install triton``): the kernels in fp32 against the float64 reference, small
  jagged shapes with 16 x 16 tiles (``configs.INTERPRETER``), so short sequences already span many tiles, edge
  tiles and mask-free interior tiles. ``TRITON_INTERPRET=1`` is set per test (it is what lets CPU tensors in);
  the kernels themselves run an interpreted copy of ``kernels.py`` whatever the process-wide setting.
- GPU (``-m gpu``): the same families at bf16/fp16 (and fp32) against the fp32 reference, larger shapes, the
  autotuned configs and the atomic-dQ variant.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gr_kernels
from gr_kernels import AttentionCall, HSTUParams, hstu_attention
from gr_kernels.backends import _LOGGED_SKIPS, resolve_backend
from gr_kernels.triton_backend import backend as triton_backend_module
from gr_kernels.triton_backend import configs
from tests.gr_kernels.native_cases import MASK_FAMILIES, rounding_floor

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    # Imported now, before any test sets TRITON_INTERPRET=1: Triton decides compiled or interpreted for its own
    # standard library at import, and a later compile (GPU tests in the same session) needs the compiled one.
    import triton  # noqa: F401
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs triton and a CUDA GPU")


@pytest.fixture
def interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """CPU tensors allowed into the backend for one test; default tiles, dQ mode and autotuning."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for name in (configs.BLOCKS_ENV, configs.AUTOTUNE_ENV, configs.SPLIT_DKDV_ENV, "GR_KERNELS_TRITON_DQ"):
        monkeypatch.delenv(name, raising=False)
    yield


@pytest.fixture
def gpu_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """GPU parity runs the first config of each list (no timing runs): compile time, not tile choice, is the cost."""
    monkeypatch.setenv(configs.AUTOTUNE_ENV, "0")
    for name in (configs.BLOCKS_ENV, configs.SPLIT_DKDV_ENV, "GR_KERNELS_TRITON_DQ"):
        monkeypatch.delenv(name, raising=False)
    yield


# --------------------------------------------------------------------------------------------------- parity helpers
def _targets(lengths: list[int], count: int) -> torch.Tensor | None:
    if not count:
        return None
    return torch.tensor([min(count, max(length - 1, 0)) for length in lengths], dtype=torch.int64)


def _case(lengths, heads, dim, *, seed=0, rab_heads=0, q_lengths=None, max_seq_len=None, hidden_dim=None, **kw):
    """``run(backend, dtype, device)``: ``[out, dq, dk, dv, (drab)]`` of one call, from float64 masters."""
    gen = torch.Generator().manual_seed(seed)
    n = max_seq_len or max([*lengths, 1])
    total = sum(lengths)
    dv_dim = hidden_dim or dim
    k = torch.randn(total, heads, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(total, heads, dv_dim, generator=gen, dtype=torch.float64)
    offsets = torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()])
    extra: dict[str, object] = {}
    if q_lengths is None:
        q = torch.randn(total, heads, dim, generator=gen, dtype=torch.float64)
    else:
        # Delta q: the queries are the last q_lengths[b] tokens of each sequence (fresh values: any q is valid).
        q = torch.randn(sum(q_lengths), heads, dim, generator=gen, dtype=torch.float64)
        q_offsets = torch.tensor([0, *torch.tensor(q_lengths, dtype=torch.int64).cumsum(0).tolist()])
        extra = {"q_offsets": q_offsets, "max_q_len": max([*q_lengths, 1])}
    rab = torch.randn(len(lengths), rab_heads, n, n, generator=gen, dtype=torch.float64) if rab_heads else None
    grad = torch.randn(q.shape[0], heads, dv_dim, generator=gen, dtype=torch.float64)
    targets = _targets(lengths, kw.pop("num_targets", 0))
    alpha = kw.pop("alpha", 1.0 / dim**0.5)

    def run(backend: str, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
        leaves = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
        bias = None if rab is None else rab.to(device, dtype).requires_grad_()
        dev_extra = {key: val.to(device) if isinstance(val, torch.Tensor) else val for key, val in extra.items()}
        out = hstu_attention(
            *leaves, offsets.to(device), n, alpha=alpha, rab=bias, backend=backend,
            num_targets=None if targets is None else targets.to(device), **dev_extra, **kw,
        )  # fmt: skip
        out.backward(grad.to(device, dtype))
        grads = [t.grad for t in leaves] + ([] if bias is None else [bias.grad])
        return [out.detach(), *grads]

    return run


def _check(lengths, heads, dim, *, dtype=torch.float32, device="cpu", **kw) -> None:
    """Forward within 2x and every gradient within 5x of the reference's own error in ``dtype``."""
    run = _case(lengths, heads, dim, **kw)
    exact_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    got, ref_low, exact = (
        run("triton", dtype, device),
        run("reference", dtype, device),
        run("reference", exact_dtype, device),
    )
    names = ["out", "dq", "dk", "dv", "drab"]
    assert len(got) == len(exact)
    for name, g, r, e in zip(names, got, ref_low, exact, strict=False):
        assert g.shape == e.shape and g.dtype == dtype, name
        if e.numel() == 0:
            continue
        err = (g.double() - e.double()).abs().max().item()
        ref_err = (r.double() - e.double()).abs().max().item()
        factor = 2 if name == "out" else 5
        bound = factor * ref_err + rounding_floor(e.float(), dtype)
        assert err <= bound, f"{name}: triton error {err:.3e} > {factor} x reference-{dtype} error {ref_err:.3e}"


MASKS = MASK_FAMILIES
RAGGED = [0, 1, 17, 40, 9]  # an empty sequence, one token, lengths that are not multiples of the 16-wide tiles


# --------------------------------------------------------------------------------------- registry, reasons, configs
def _call(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, dim: int = 64, **params) -> AttentionCall:
    p = HSTUParams(params.pop("max_seq_len", 8), 1.0, 8, **params)
    return AttentionCall(p, torch.device(device), dtype, 2, dim, dim, torch.int64, False, 0, False)


def test_registered_between_cutlass_and_the_reference() -> None:
    assert gr_kernels.available_backends() == ["cutlass", "triton", "reference"]
    assert gr_kernels.get_backend("triton").priority < gr_kernels.get_backend("cutlass").priority


def test_missing_triton_is_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_backend_module, "_TRITON_FOUND", False)
    reason = gr_kernels.get_backend("triton").supports(_call())
    assert reason is not None and "triton package is not installed" in reason


@needs_triton
@pytest.mark.parametrize(
    ("call", "reason"),
    [
        (_call("cpu", torch.float32), "not CUDA"),
        (_call("meta", torch.float32), "not CUDA"),
        (_call("cuda", torch.float64), "dtype"),
        (_call("cuda", torch.bfloat16, dim=512), "at most 256"),
        (_call("cuda", torch.bfloat16, dropout_p=0.1), "dropout"),
        (_call("cuda", torch.bfloat16, max_seq_len=50_000), "32-bit offsets"),
    ],
)
def test_unsupported_calls_name_the_reason(call: AttentionCall, reason: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # The capability check runs last; a fake one keeps these cases meaningful on CPU-only machines.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    msg = gr_kernels.get_backend("triton").supports(call)
    assert msg is not None and reason in msg, msg


def test_auto_leaves_cuda_float32_to_the_reference() -> None:
    backend = gr_kernels.get_backend("triton")
    assert "float32 on CUDA" in (backend.auto_skip(_call("cuda", torch.float32)) or "")
    assert backend.auto_skip(_call("cuda", torch.bfloat16)) is None
    assert backend.auto_skip(_call("cpu", torch.float32)) is None  # the interpreter path is only ever asked for


@needs_triton
def test_old_gpus_name_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "sm80" in gr_kernels.get_backend("triton").supports(_call("cuda", torch.bfloat16))
    assert gr_kernels.get_backend("triton").supports(_call("cuda", torch.float16)) is None


@needs_triton
def test_auto_uses_the_interpreter_only_when_asked(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    call = _call("cpu", torch.float32)
    _LOGGED_SKIPS.clear()
    with caplog.at_level(logging.INFO, logger="gr_kernels"):
        assert resolve_backend("auto", call) == "reference"
    assert any("'triton' not used" in r.getMessage() and "TRITON_INTERPRET" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", call) == "triton"
    assert resolve_backend("auto", _call("cpu", torch.float16)) == "triton"
    assert resolve_backend("auto", _call("cpu", torch.float64)) == "reference"
    assert "bfloat16" in gr_kernels.get_backend("triton").supports(_call("cpu", torch.bfloat16))


@needs_triton
def test_interpreter_copy_leaves_the_process_setting_alone(interpreter: None) -> None:
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    from gr_kernels.triton_backend import launch

    os.environ.pop("TRITON_INTERPRET")
    before = triton.knobs.runtime.interpret
    interpreted = launch.interpreted_kernels()
    assert isinstance(interpreted.hstu_fwd_kernel, InterpretedFunction)
    assert triton.knobs.runtime.interpret == before and "TRITON_INTERPRET" not in os.environ
    if not before:
        compiled = launch.compiled_kernels()
        assert isinstance(compiled.hstu_fwd_kernel, triton.JITFunction)


def test_config_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(configs.AUTOTUNE_ENV, raising=False)
    monkeypatch.delenv(configs.BLOCKS_ENV, raising=False)
    assert configs.candidates(configs.FWD, 128, interpreted=False) == configs.FWD[128]
    assert configs.candidates(configs.FWD, 128, interpreted=True) == (configs.INTERPRETER,)
    assert configs.candidates(configs.DQ, 32, interpreted=False) == configs.DQ[64]  # small dims share the 64 list
    monkeypatch.setenv(configs.AUTOTUNE_ENV, "0")
    assert configs.candidates(configs.DKDV, 256, interpreted=False) == (configs.DKDV[256][0],)
    monkeypatch.setenv(configs.BLOCKS_ENV, "32,16")
    (forced,) = configs.candidates(configs.FWD, 64, interpreted=False)
    assert (forced.block_m, forced.block_n) == (32, 16)
    for bad in ("32", "24,16", "8,16", "a,b"):
        monkeypatch.setenv(configs.BLOCKS_ENV, bad)
        with pytest.raises(ValueError, match=configs.BLOCKS_ENV):
            configs.forced_blocks()
    monkeypatch.delenv(configs.SPLIT_DKDV_ENV, raising=False)
    assert configs.split_dkdv(256, interpreted=False) and not configs.split_dkdv(128, interpreted=False)
    assert not configs.split_dkdv(256, interpreted=True)
    monkeypatch.setenv(configs.SPLIT_DKDV_ENV, "1")
    assert configs.split_dkdv(64, interpreted=True)
    monkeypatch.setenv(configs.SPLIT_DKDV_ENV, "yes")
    with pytest.raises(ValueError, match=configs.SPLIT_DKDV_ENV):
        configs.split_dkdv(64, interpreted=False)
    for table in (configs.FWD, configs.DKDV, configs.DQ):
        assert all(len(options) <= 3 for options in table.values())  # the documented, limited autotune set


@needs_triton
def test_dq_mode_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    from gr_kernels.triton_backend import launch

    monkeypatch.delenv(launch.DQ_ENV, raising=False)
    assert launch.dq_mode() == "separate"
    monkeypatch.setenv(launch.DQ_ENV, "atomic")
    assert launch.dq_mode() == "atomic"
    monkeypatch.setenv(launch.DQ_ENV, "fast")
    with pytest.raises(ValueError, match=launch.DQ_ENV):
        launch.dq_mode()


@needs_triton
def test_configs_that_do_not_fit_fall_back_to_smaller_ones() -> None:
    from triton.runtime.errors import OutOfResources

    from gr_kernels.triton_backend import launch

    tried: list[configs.TileConfig] = []

    def run(cfg: configs.TileConfig) -> None:
        tried.append(cfg)
        if cfg.block_m > 64:
            raise OutOfResources(cfg.block_m * 1024, 100 * 1024, "shared memory")

    options = configs.FWD[128]
    assert launch._first_that_fits(run, options) == options[2] and tried == list(options)
    with pytest.raises(OutOfResources):
        launch._first_that_fits(run, options[:2])
    with pytest.raises(ZeroDivisionError):  # anything else is not a resource problem: raised at once
        launch._first_that_fits(lambda cfg: 1 / 0, options)


@needs_triton
def test_offsets_that_overflow_int32_are_a_clear_error() -> None:
    from gr_kernels.triton_backend import launch

    big = torch.empty_strided((700_000, 4, 256), (4 * 256 * 3, 256, 1), device="meta")  # a fused-projection view
    with pytest.raises(ValueError, match="32-bit offsets"):
        launch.check_offsets_fit(700_000, q=big)
    launch.check_offsets_fit(4096, q=big)


def _compile_for(arch: int, kernel_name: str, constexprs: dict, num_warps: int) -> dict:
    """Compiles one kernel for ``sm<arch>`` without a GPU (Triton ships ptxas): catches what only the compiler
    sees (layouts, types of scalar branches), which the interpreter does not. Returns the kernel's metadata."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gr_kernels.triton_backend import launch

    fn = getattr(launch.compiled_kernels(), kernel_name)
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("SEQ_OFFSETS", "Q_OFFSETS", "NUM_TARGETS"):
            sig[name] = "*i32"
        elif name in ("DQ", "DRAB"):
            sig[name] = "*fp32"
        elif name.isupper():
            sig[name] = "*bf16"
        else:
            sig[name] = "fp32" if name in ("alpha", "inv_scale") else "i32"
    # What the JIT specializes for 16-byte aligned inputs whose row strides are multiples of 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n.isupper() or "stride" in n}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": 2})
    return {"shared": kernel.metadata.shared, "ptx": kernel.asm["ptx"]}


@needs_triton
@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_for_gpus_without_one(arch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import triton

    from gr_kernels.triton_backend import launch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not isinstance(launch.compiled_kernels().hstu_fwd_kernel, triton.JITFunction):
        pytest.skip("Triton or kernels.py was imported under TRITON_INTERPRET=1 in this process")
    every_flag = dict(CAUSAL=False, HAS_WINDOW=True, HAS_CONTEXT=True, HAS_TARGETS=True, HAS_RAB=True, DELTA_Q=True,
                      PRECISION="tf32", DIM_QK=64, DIM_V=48, BLOCK_DQK=64, BLOCK_DV=64)  # fmt: skip
    every_flag.update(BLOCK_M=64, BLOCK_N=32)
    fwd = _compile_for(arch, "hstu_fwd_kernel", every_flag, 4)
    if arch == 90:
        assert "wgmma.mma_async" in fwd["ptx"] and "cp.async" in fwd["ptx"]  # tensor cores, pipelined loads
        _compile_for(arch, "hstu_bwd_dkdv_kernel", dict(every_flag, ATOMIC_DQ=True, DRAB_MODE=2, PASS=0), 4)
        _compile_for(arch, "hstu_bwd_dkdv_kernel", dict(every_flag, ATOMIC_DQ=False, DRAB_MODE=0, PASS=2), 4)
        _compile_for(arch, "hstu_bwd_dq_kernel", dict(every_flag, DRAB_MODE=1), 4)
    else:
        assert "mma.sync.aligned" in fwd["ptx"]


# ------------------------------------------------------------------------------------------ CPU interpreter parity
@needs_triton
@pytest.mark.parametrize("mask", sorted(MASKS))
def test_interpreter_masks(mask: str, interpreter: None) -> None:
    rab_heads = sorted(MASKS).index(mask) % 3  # none, shared, per head, in turn
    _check(RAGGED, 2, 16, rab_heads=rab_heads, max_seq_len=41, **MASKS[mask])


@needs_triton
@pytest.mark.parametrize("rab_heads", [0, 1, 2])
def test_interpreter_rab(rab_heads: int, interpreter: None) -> None:
    _check([33, 0, 20], 2, 16, rab_heads=rab_heads, seed=1, **MASKS["context_targets_window"])


@needs_triton
@pytest.mark.parametrize("mask", ["causal", "full", "window", "context_targets_window", "targets_groups"])
def test_interpreter_delta_q(mask: str, interpreter: None) -> None:
    # Ragged query counts: none, all of a sequence, one, a few; queries that are targets, context or history.
    _check(RAGGED, 2, 16, q_lengths=[0, 1, 5, 17, 9], rab_heads=2, seed=2, **MASKS[mask])


@needs_triton
@pytest.mark.parametrize("blocks", ["16,32", "32,16"])
@pytest.mark.parametrize("mask", ["causal", "window_full", "context_targets_window"])
def test_interpreter_tile_shapes(blocks: str, mask: str, interpreter: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # Unequal query/key tiles move the edge between mask-free and masked tiles off the diagonal's tile corners.
    monkeypatch.setenv(configs.BLOCKS_ENV, blocks)
    _check([3, 47, 64, 33], 1, 16, rab_heads=1, seed=3, **MASKS[mask])


@needs_triton
@pytest.mark.parametrize(
    ("dq", "split", "rab_heads"), [("atomic", "0", 1), ("atomic", "1", 2), ("separate", "1", 1), ("atomic", "1", 0)]
)
def test_interpreter_backward_variants(
    dq: str, split: str, rab_heads: int, interpreter: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # dQ with atomics in the dK/dV kernel, and dK/dV in two passes (the head-dim-256 path on GPU).
    monkeypatch.setenv("GR_KERNELS_TRITON_DQ", dq)
    monkeypatch.setenv(configs.SPLIT_DKDV_ENV, split)
    _check(RAGGED, 2, 16, rab_heads=rab_heads, seed=4, **MASKS["targets_groups"])


@needs_triton
@pytest.mark.parametrize("rab_heads", [1, 2])
def test_interpreter_frozen_bias(rab_heads: int, interpreter: None) -> None:
    # A bias that needs no gradient: the kernels read it (DRAB_MODE 0), q/k/v gradients equal the trainable run's.
    gen = torch.Generator().manual_seed(9)
    lengths = [9, 0, 21]
    offsets = torch.tensor([0, 9, 9, 30])
    q, k, v = (torch.randn(30, 2, 16, generator=gen) for _ in range(3))
    rab = torch.randn(3, rab_heads, 21, 21, generator=gen)

    def grads(trainable: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        bias = rab.clone().requires_grad_(trainable)
        out = hstu_attention(*leaves, offsets, max(lengths), alpha=0.5, rab=bias, backend="triton")
        out.square().sum().backward()
        return [t.grad for t in leaves], bias.grad

    trained, drab = grads(True)
    frozen, no_drab = grads(False)
    assert drab is not None and no_drab is None
    for a, b in zip(trained, frozen, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@needs_triton
def test_interpreter_float16(interpreter: None) -> None:
    _check(RAGGED, 2, 16, dtype=torch.float16, rab_heads=1, seed=8, **MASKS["context_targets_window"])


@needs_triton
def test_interpreter_padded_head_dims(interpreter: None) -> None:
    # q/k dim 24 and v dim 40: neither a power of two, so the kernels mask the padded columns.
    _check([20, 7], 2, 24, hidden_dim=40, rab_heads=1, seed=5, **MASKS["window"])


@needs_triton
def test_interpreter_strided_inputs_and_scaling(interpreter: None) -> None:
    # q/k/v as views of one fused projection (row stride 3 * heads * dim), scaling_seqlen and alpha given.
    total, heads, dim = 37, 2, 16
    gen = torch.Generator().manual_seed(6)
    fused = torch.randn(total, 3 * heads * dim, generator=gen)
    q, k, v = (t.view(total, heads, dim) for t in fused.split(heads * dim, dim=1))
    offsets = torch.tensor([0, 30, 37])
    kw = dict(alpha=0.7, scaling_seqlen=11, contextual_seq_len=2)
    out = hstu_attention(q, k, v, offsets, 30, backend="triton", **kw)
    exact = hstu_attention(*(t.double() for t in (q, k, v)), offsets, 30, backend="reference", **kw)
    torch.testing.assert_close(out.double(), exact, atol=1e-5, rtol=1e-5)


@needs_triton
def test_interpreter_empty_inputs(interpreter: None) -> None:
    q = torch.randn(0, 2, 16, requires_grad=True)
    for offsets in (torch.tensor([0]), torch.tensor([0, 0, 0])):
        out = hstu_attention(q, q, q, offsets, 4, alpha=1.0, backend="triton")
        assert out.shape == (0, 2, 16)
        out.sum().backward()
        assert q.grad is not None and q.grad.shape == q.shape


@needs_triton
@settings(max_examples=8, deadline=None, database=None)
@given(data=st.data())
def test_interpreter_hypothesis(data: st.DataObject) -> None:
    lengths = data.draw(st.lists(st.integers(0, 40), min_size=1, max_size=4))
    delta = data.draw(st.booleans())
    q_lengths = [data.draw(st.integers(0, length)) for length in lengths] if delta else None
    kw = {
        "seed": data.draw(st.integers(0, 1000)),
        "rab_heads": data.draw(st.sampled_from([0, 1, 2])),
        "alpha": data.draw(st.sampled_from([1.0, 0.1])),
        "causal": data.draw(st.booleans()),
        "max_attn_len": data.draw(st.sampled_from([0, 0, 1, 5, 20])),
        "contextual_seq_len": data.draw(st.sampled_from([0, 0, 1, 4])),
        "num_targets": data.draw(st.sampled_from([0, 0, 1, 5])),
        "target_group_size": data.draw(st.sampled_from([1, 2, 3])),
    }
    dim = data.draw(st.sampled_from([8, 16, 32]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        mp.setenv(configs.BLOCKS_ENV, data.draw(st.sampled_from(["16,16", "16,32", "32,16"])))
        _check(lengths, 2, dim, q_lengths=q_lengths, max_seq_len=max([*lengths, 1]) + 3, **kw)


# ------------------------------------------------------------------------------------------------------ GPU parity
GPU_RAGGED = [0, 1, 130, 77, 200]


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("mask", sorted(MASKS))
def test_gpu_masks(mask: str, gpu_env: None) -> None:
    rab_heads = sorted(MASKS).index(mask) % 3
    _check(GPU_RAGGED, 2, 64, dtype=torch.bfloat16, device="cuda", rab_heads=rab_heads, **MASKS[mask])


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("dtype", "dim"),
    [(torch.bfloat16, 32), (torch.bfloat16, 128), (torch.bfloat16, 256), (torch.float16, 64), (torch.float16, 96)],
)
def test_gpu_dtypes_and_head_dims(dtype: torch.dtype, dim: int, gpu_env: None) -> None:
    _check([1, 65, 300, 129], 2, dim, dtype=dtype, device="cuda", rab_heads=1, num_targets=4, max_seq_len=333)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(("dim", "mask"), [(128, "causal"), (64, "context_targets_window")])
def test_gpu_delta_q(dim: int, mask: str, gpu_env: None) -> None:
    _check(GPU_RAGGED, 2, dim, dtype=torch.bfloat16, device="cuda", q_lengths=[0, 1, 64, 77, 3], rab_heads=2,
           **MASKS[mask])  # fmt: skip


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(("dim", "mask", "rab_heads"), [(128, "causal", 0), (256, "context_targets_window", 2)])
def test_gpu_long_sequences(dim: int, mask: str, rab_heads: int, gpu_env: None) -> None:
    _check([700, 1, 1030, 257], 2, dim, dtype=torch.bfloat16, device="cuda", rab_heads=rab_heads, max_seq_len=1031,
           **MASKS[mask])  # fmt: skip


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(("dim", "split"), [(128, "0"), (128, "1"), (256, "0")])
def test_gpu_backward_variants(dim: int, split: str, gpu_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # Atomic dQ with fused or two-pass dK/dV (head dim 256 defaults to two passes: here the fused one too).
    monkeypatch.setenv("GR_KERNELS_TRITON_DQ", "atomic")
    monkeypatch.setenv(configs.SPLIT_DKDV_ENV, split)
    _check(GPU_RAGGED, 2, dim, dtype=torch.bfloat16, device="cuda", rab_heads=1, **MASKS["targets_groups"])


@needs_cuda
@pytest.mark.gpu
def test_gpu_fp32(gpu_env: None) -> None:
    _check(GPU_RAGGED, 2, 64, dtype=torch.float32, device="cuda", rab_heads=2, **MASKS["window"])


@needs_cuda
@pytest.mark.gpu
def test_gpu_autotuned(monkeypatch: pytest.MonkeyPatch) -> None:
    # The timed choice among the listed configs (dQ/dRab buffers re-zeroed between timing runs).
    monkeypatch.delenv(configs.AUTOTUNE_ENV, raising=False)
    monkeypatch.delenv(configs.BLOCKS_ENV, raising=False)
    _check([1, 500, 257, 1000], 2, 128, dtype=torch.bfloat16, device="cuda", rab_heads=1)


@needs_cuda
@pytest.mark.gpu
def test_gpu_torch_compile(gpu_env: None) -> None:
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(202, 2, 64, generator=gen).to("cuda", torch.bfloat16) for _ in range(3))
    offsets = torch.tensor([0, 3, 73, 202], device="cuda")

    def step(q, k, v):
        return hstu_attention(q, k, v, offsets, 129, alpha=0.125, backend="triton", validate=False)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.float().square().sum().backward()
        results.append([out, *(t.grad for t in leaves)])
    torch.testing.assert_close(results[1][0], results[0][0], atol=0, rtol=0)  # same kernel, same inputs
    for eager, compiled in zip(results[0][1:], results[1][1:], strict=True):  # grad_out may be fused differently
        torch.testing.assert_close(compiled, eager)


@needs_cuda
@pytest.mark.gpu
@settings(max_examples=5, deadline=None, database=None)
@given(data=st.data())
def test_gpu_hypothesis(data: st.DataObject) -> None:
    lengths = data.draw(st.lists(st.integers(0, 300), min_size=1, max_size=5))
    kw = {
        "seed": data.draw(st.integers(0, 1000)),
        "rab_heads": data.draw(st.sampled_from([0, 1, 2])),
        "causal": data.draw(st.booleans()),
        "max_attn_len": data.draw(st.sampled_from([0, 0, 16, 100])),
        "contextual_seq_len": data.draw(st.sampled_from([0, 0, 4])),
        "num_targets": data.draw(st.sampled_from([0, 0, 5])),
        "target_group_size": data.draw(st.sampled_from([1, 2])),
    }
    dtype = data.draw(st.sampled_from([torch.bfloat16, torch.float16]))
    dim = data.draw(st.sampled_from([64, 128, 256]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(configs.AUTOTUNE_ENV, "0")
        _check(lengths, 2, dim, dtype=dtype, device="cuda", **kw)
