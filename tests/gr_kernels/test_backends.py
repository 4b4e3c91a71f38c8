"""The backend registry: auto selection, skip logging, forced backends, dispatch of forward and backward."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor

import gr_kernels
from gr_kernels import AttentionCall, HSTUParams, ReferenceBackend, hstu_attention
from gr_kernels.backends import resolve_backend


class SpyBackend(ReferenceBackend):
    """Runs the reference, records which of its methods ran, and supports only what ``rule`` allows."""

    def __init__(self, priority: int, rule: Callable[[AttentionCall], str | None]) -> None:
        self.priority = priority
        self.rule = rule
        self.calls: list[str] = []

    def supports(self, call: AttentionCall) -> str | None:
        return self.rule(call)

    def forward(self, *args: object) -> Tensor:
        self.calls.append("forward")
        return super().forward(*args)  # type: ignore[arg-type]

    def backward(self, *args: object) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        self.calls.append("backward")
        return super().backward(*args)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def only_reference() -> Iterator[None]:
    """These tests reason about a registry holding only the reference: the built-in backends step aside."""
    saved = {name: gr_kernels.get_backend(name) for name in ("cutlass", "triton")}
    for name in saved:
        gr_kernels.unregister_backend(name)
    yield
    for name, backend in saved.items():
        gr_kernels.register_backend(name, backend, replace=True)


@pytest.fixture
def registered() -> Iterator[list[str]]:
    """Names registered during a test; unregistered afterwards whatever happens."""
    names: list[str] = []
    yield names
    for name in names:
        gr_kernels.unregister_backend(name)
    assert gr_kernels.available_backends() == ["reference"]


def _register(names: list[str], name: str, backend: object) -> None:
    gr_kernels.register_backend(name, backend)  # type: ignore[arg-type]
    names.append(name)


@pytest.fixture
def x(jagged: Callable):
    return jagged([2, 3], heads=1, attn_dim=4, hidden_dim=4, seed=6)


def _run(x, **kw: object) -> Tensor:
    return hstu_attention(x.q, x.k, x.v, x.seq_offsets, x.max_seq_len, alpha=1.0, **kw)  # type: ignore[arg-type]


def test_reference_is_builtin_and_auto_default(x) -> None:
    assert gr_kernels.available_backends() == ["reference"]
    call = AttentionCall(
        HSTUParams(4, 1.0, 4), torch.device("cpu"), torch.float32, 1, 4, 4, torch.int64, False, 0, False
    )
    assert resolve_backend("auto", call) == "reference"
    torch.testing.assert_close(_run(x), _run(x, backend="reference"), rtol=0, atol=0)


def test_auto_skips_unsupported_with_one_log_line(x, registered: list[str], caplog: pytest.LogCaptureFixture) -> None:
    picky = SpyBackend(10, lambda c: None if c.dtype == torch.float16 else "needs float16 inputs")
    _register(registered, "picky_test", picky)
    assert gr_kernels.available_backends() == ["picky_test", "reference"]
    with caplog.at_level(logging.INFO, logger="gr_kernels"):
        _run(x)
        _run(x).sum().backward()
    lines = [r.getMessage() for r in caplog.records if r.name == "gr_kernels"]
    assert lines == ["hstu_attention: backend 'picky_test' not used: needs float16 inputs"]
    assert picky.calls == []  # auto fell back to the reference
    # Once supported, auto picks it, and autograd dispatches the backward to the same backend.
    q, k, v = (t.detach().half().requires_grad_() for t in (x.q, x.k, x.v))
    out = hstu_attention(q, k, v, x.seq_offsets, x.max_seq_len, alpha=1.0)
    out.float().sum().backward()
    assert picky.calls == ["forward", "backward"] and out.dtype == torch.float16


def test_priorities_order_the_auto_choice(x, registered: list[str]) -> None:
    low, high = SpyBackend(1, lambda c: None), SpyBackend(5, lambda c: None)
    _register(registered, "low_test", low)
    _register(registered, "high_test", high)
    assert gr_kernels.available_backends() == ["high_test", "low_test", "reference"]
    _run(x)
    assert high.calls == ["forward"] and low.calls == []
    _run(x, backend="low_test")
    assert low.calls == ["forward"]


def test_auto_skip_passes_over_a_backend_that_runs_when_named(
    x, registered: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    slow = SpyBackend(10, lambda c: None)
    slow.auto_skip = lambda c: None if c.dtype == torch.float16 else "slower than the reference here"  # type: ignore[attr-defined]
    _register(registered, "slow_test", slow)
    with caplog.at_level(logging.INFO, logger="gr_kernels"):
        _run(x)
    assert slow.calls == []
    assert [r.getMessage() for r in caplog.records if r.name == "gr_kernels"] == [
        "hstu_attention: backend 'slow_test' not used: slower than the reference here"
    ]
    _run(x, backend="slow_test")  # named: auto_skip does not apply
    assert slow.calls == ["forward"]
    q, k, v = (t.detach().half() for t in (x.q, x.k, x.v))
    hstu_attention(q, k, v, x.seq_offsets, x.max_seq_len, alpha=1.0)
    assert slow.calls == ["forward", "forward"]


def test_forced_backends(x, registered: list[str]) -> None:
    _register(registered, "never_test", SpyBackend(10, lambda c: "head dim must be a multiple of 64"))
    with pytest.raises(ValueError, match="backend 'never_test' cannot run this call: head dim must be a multiple"):
        _run(x, backend="never_test")
    with pytest.raises(ValueError, match=r"unknown hstu_attention backend 'nope'; registered: \['never_test', 'refer"):
        _run(x, backend="nope")


def test_registration_errors(registered: list[str]) -> None:
    _register(registered, "dup_test", SpyBackend(1, lambda c: None))
    with pytest.raises(ValueError, match="already registered"):
        gr_kernels.register_backend("dup_test", SpyBackend(1, lambda c: None))
    gr_kernels.register_backend("dup_test", SpyBackend(2, lambda c: None), replace=True)
    with pytest.raises(ValueError, match="built in"):
        gr_kernels.register_backend("reference", ReferenceBackend())
    with pytest.raises(ValueError, match="cannot be unregistered"):
        gr_kernels.unregister_backend("reference")
    with pytest.raises(ValueError, match="identifier other than 'auto'"):
        gr_kernels.register_backend("auto", ReferenceBackend())
    with pytest.raises(TypeError, match="no callable backward"):
        gr_kernels.register_backend("bad_test", type("B", (), {"priority": 1, "forward": print, "supports": print})())
    with pytest.raises(TypeError, match="int priority"):
        gr_kernels.register_backend("bad_test", type("B", (ReferenceBackend,), {"priority": None})())


def test_supports_sees_call_metadata(jagged: Callable, registered: list[str]) -> None:
    seen: list[AttentionCall] = []
    _register(registered, "probe_test", SpyBackend(1, lambda c: seen.append(c) or "probe only"))
    x = jagged([2, 3], heads=2, attn_dim=4, hidden_dim=3, rab_heads=1, seed=1, dtype=torch.float32)
    hstu_attention(x.q, x.k, x.v, x.seq_offsets.int(), x.max_seq_len, alpha=0.5, rab=x.rab, dropout_p=0.1,
                   num_targets=torch.tensor([0, 1]), max_attn_len=2, training=False)  # fmt: skip
    (call,) = seen
    assert (call.num_heads, call.attention_dim, call.hidden_dim, call.rab_heads) == (2, 4, 3, 1)
    assert call.dtype == torch.float32 and call.offsets_dtype == torch.int32 and call.has_targets
    assert call.params.max_attn_len == 2 and call.params.dropout_p == 0.0 and call.requires_grad


class DrabRecorder(ReferenceBackend):
    """The reference, recording the ``need_drab`` each backward call was given (absent: True)."""

    priority = 5

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def supports(self, call: AttentionCall) -> str | None:
        return None

    def backward(self, *args: object, need_drab: bool = True, **kw: object):  # type: ignore[override]
        self.seen.append(need_drab)
        return super().backward(*args, need_drab=need_drab, **kw)  # type: ignore[arg-type]


def _grads_with_bias(x, backend: str, trainable_bias: bool) -> tuple[list[Tensor | None], Tensor | None]:
    q, k, v = (t.detach().clone().requires_grad_() for t in (x.q, x.k, x.v))
    rab = x.rab.detach().clone().requires_grad_(trainable_bias)
    out = hstu_attention(q, k, v, x.seq_offsets, x.max_seq_len, alpha=0.7, rab=rab, backend=backend)
    out.square().sum().backward()
    return [q.grad, k.grad, v.grad], rab.grad


@pytest.mark.parametrize("rab_heads", [1, 2])
def test_frozen_bias_skips_its_gradient(jagged: Callable, registered: list[str], rab_heads: int) -> None:
    # A bias that needs no gradient reaches the backend as need_drab=False (no drab pass, no drab buffer); q/k/v
    # gradients are those of a trainable bias, and the bias gets none.
    x = jagged([3, 0, 5, 1], heads=2, attn_dim=4, hidden_dim=3, rab_heads=rab_heads, seed=4)
    recorder = DrabRecorder()
    _register(registered, "drab_recorder", recorder)
    assert gr_kernels.backends.skips_drab("drab_recorder")
    trained, rab_grad = _grads_with_bias(x, "drab_recorder", trainable_bias=True)
    frozen, no_grad = _grads_with_bias(x, "drab_recorder", trainable_bias=False)
    assert recorder.seen == [True, False]
    assert rab_grad is not None and rab_grad.abs().sum() > 0 and no_grad is None
    for a, b in zip(trained, frozen, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_backend_without_need_drab_still_serves_a_frozen_bias(jagged: Callable, registered: list[str]) -> None:
    # A backend whose backward takes no need_drab computes drab anyway; the op drops it.
    x = jagged([4, 2], heads=2, attn_dim=4, hidden_dim=4, rab_heads=1, seed=5)
    spy = SpyBackend(5, lambda c: None)
    _register(registered, "no_need_drab", spy)
    assert not gr_kernels.backends.skips_drab("no_need_drab")
    frozen, no_grad = _grads_with_bias(x, "no_need_drab", trainable_bias=False)
    want, _ = _grads_with_bias(x, "reference", trainable_bias=False)
    assert spy.calls == ["forward", "backward"] and no_grad is None
    for a, b in zip(frozen, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_backward_op_without_drab(jagged: Callable) -> None:
    # The op itself (opcheck: schema, fake and real agree) with need_drab=False returns no drab.
    x = jagged([3, 2], heads=2, attn_dim=4, hidden_dim=3, rab_heads=1, seed=7)
    scalars = (x.max_seq_len, 0.5, x.max_seq_len, True, 0, 0, 1, 0.0, 0, "reference", None, 0)
    q, k, v, rab = (t.detach() for t in (x.q, x.k, x.v, x.rab))
    args = (torch.randn(v.shape), q, k, v, x.seq_offsets, None, rab, *scalars)
    torch.library.opcheck(torch.ops.gr_kernels.hstu_attention_bwd, (*args, False))
    with_drab = torch.ops.gr_kernels.hstu_attention_bwd(*args, True)
    without = torch.ops.gr_kernels.hstu_attention_bwd(*args, False)
    assert with_drab[3] is not None and without[3] is None
    for a, b in zip(with_drab[:3], without[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compiled_backward_skips_a_frozen_bias_gradient(jagged: Callable, registered: list[str]) -> None:
    # Under torch.compile (AOTAutograd) the backward still learns that rab needs no gradient: the backend gets
    # need_drab=False, and the q/k/v gradients are eager's.
    x = jagged([3, 0, 2], heads=2, attn_dim=4, hidden_dim=4, rab_heads=1, seed=6)
    recorder = DrabRecorder()
    _register(registered, "drab_recorder", recorder)
    rab = x.rab.detach()

    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = hstu_attention(q, k, v, x.seq_offsets, x.max_seq_len, alpha=0.5, rab=rab, backend="drab_recorder")
        return out.square().sum()

    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x.q, x.k, x.v)
    got_grads = torch.autograd.grad(got, (x.q, x.k, x.v))
    assert recorder.seen == [False]
    want_grads = torch.autograd.grad(fn(x.q, x.k, x.v), (x.q, x.k, x.v))
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b)
