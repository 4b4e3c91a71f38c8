"""compile_hstu_blocks(scope="projections"): blocks with compiled project/finish equal eager ones (outputs and every
gradient) on jagged batches of any size, without recompiling per batch; validation, copies, argument errors.

Recompiles are counted with Dynamo's global counters (``torch._dynamo.utils.counters``): ``frames/total`` (frames
Dynamo compiled), ``stats/unique_graphs`` (FX graphs captured), ``aot_autograd/total`` (forward+backward graphs
AOTAutograd built) and ``graph_break``.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from gr_models.modules import HSTUConfig, HSTUEncoder, compile_hstu_blocks, uncompile_hstu_blocks
from gr_models.modules.compile import COMPILE_MODES, is_compiled
from tests.gr_models.compile_helpers import (
    assert_passes_equal,
    compile_counts,
    counts_since,
    jagged_batch,
    train_pass,
)

DIM = 16
CONFIG = HSTUConfig(embedding_dim=DIM, num_blocks=3, num_heads=2, max_seq_len=32, dropout=0.0)
_compile_counts, _delta = compile_counts, counts_since


def _batch(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    return jagged_batch(lengths, seed, DIM)


_train_pass, _assert_passes_equal = train_pass, assert_passes_equal


@pytest.fixture(scope="module")
def pair() -> dict:
    """An eager encoder and a compiled copy (same weights), warmed up on one training batch (its compile counts)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = HSTUEncoder(CONFIG).train()
    compiled = compile_hstu_blocks(copy.deepcopy(eager), scope="projections")
    before = _compile_counts()
    warm = _batch([5, 9, 3], seed=0)
    _assert_passes_equal(_train_pass(compiled, warm), _train_pass(eager, warm))
    return {"eager": eager, "compiled": compiled, "warmup": _delta(before)}


def test_first_batch_compiles_one_graph_per_function_shared_by_all_blocks(pair: dict) -> None:
    # project and finish: one Dynamo frame and graph each, one AOTAutograd forward+backward each, for all 3 blocks.
    assert pair["warmup"] == {"frames": 2, "graphs": 2, "aot": 2, "breaks": 0}
    assert all(is_compiled(b) for b in pair["compiled"].blocks)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(0, 32), min_size=1, max_size=7), seed=st.integers(0, 2**16))
def test_compiled_equals_eager_and_never_recompiles(pair: dict, lengths: list[int], seed: int) -> None:
    # Any batch size, any total above 1 token (torch specialises a dim of size 0 or 1: one more graph), any
    # max_seq_len up to the model's: no new frame, graph or AOTAutograd compile after the warm-up batch.
    assume(sum(lengths) >= 2)
    batch = _batch(lengths, seed)
    before = _compile_counts()
    got = _train_pass(pair["compiled"], batch)
    assert _delta(before) == {"frames": 0, "graphs": 0, "aot": 0, "breaks": 0}
    _assert_passes_equal(got, _train_pass(pair["eager"], batch))


def test_no_grad_inference_compiles_once_then_reuses(pair: dict) -> None:
    eager, compiled = pair["eager"].eval(), pair["compiled"].eval()
    try:
        before = _compile_counts()
        with torch.no_grad():
            for i, lengths in enumerate([[4, 7], [1, 2, 3, 30], [16]]):
                x, offsets, max_len, ts = _batch(lengths, seed=100 + i)
                got = compiled(x, offsets, max_len, ts, ts + 5)
                torch.testing.assert_close(got, eager(x, offsets, max_len, ts, ts + 5), rtol=1e-5, atol=1e-5)
        # Grad mode is part of the guards: project and finish once more each (inference graphs), then reused.
        assert _delta(before) == {"frames": 2, "graphs": 2, "aot": 2, "breaks": 0}
    finally:
        eager.train(), compiled.train()


def test_compiled_blocks_keep_the_ops_value_checks(pair: dict) -> None:
    # Block 0 validates offsets on the host (validate=True); the op runs eagerly between the compiled parts.
    x, offsets, _, ts = _batch([6, 10], seed=3)
    with pytest.raises(ValueError, match="max_seq_len"):
        pair["compiled"](x, offsets, 8, ts, ts + 5)
    with pytest.raises(ValueError, match="seq_offsets"):
        pair["compiled"](x, offsets + 1, 16, ts, ts + 5)


def test_copies_names_and_uncompile() -> None:
    torch.manual_seed(1)
    enc = HSTUEncoder(CONFIG)
    names = [n for n, _ in enc.named_parameters()]
    compile_hstu_blocks(enc, scope="projections", backend="aot_eager")
    assert [n for n, _ in enc.named_parameters()] == names and list(enc.state_dict()) == names
    # A deep copy (or a pickled one) computes with its own weights, not the original's.
    clones = [copy.deepcopy(enc), pickle.loads(pickle.dumps(enc))]
    x, offsets, max_len, ts = _batch([4, 6], seed=5)
    for clone in clones:
        assert all(is_compiled(b) for b in clone.blocks)
        assert clone.blocks[0].project.block is clone.blocks[0]
        with torch.no_grad():
            clone.blocks[1].output.bias.add_(1.0)
            torch.testing.assert_close(clone(x, offsets, max_len, ts, ts), enc(x, offsets, max_len, ts, ts) + 1.0)
    # Keyword arguments reach the compiled function too.
    block = enc.blocks[0]
    with torch.no_grad():
        u, v, q, k = block.project(x=x)
        for got, want in zip((u, v, q, k), type(block).project(block, x), strict=True):
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(block.finish(x, u=u, attn=v), type(block).finish(block, x, u, v))
    # Compiling again replaces the options; uncompiling restores the class methods.
    compile_hstu_blocks(enc, scope="projections", dynamic=False, backend="aot_eager")
    assert enc.blocks[0].finish.dynamic is False
    uncompile_hstu_blocks(enc)
    assert not any(is_compiled(b) for b in enc.blocks)
    assert "project" not in vars(enc.blocks[0]) and enc.blocks[0].project.__func__ is type(enc.blocks[0]).project


def test_bad_arguments() -> None:
    enc = HSTUEncoder(CONFIG)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        compile_hstu_blocks(CONFIG)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no HSTUEncoder"):
        compile_hstu_blocks(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="mode must be one of"):
        compile_hstu_blocks(enc, mode="reduce-overhead")
    with pytest.raises(TypeError, match="dynamic must be a bool"):
        compile_hstu_blocks(enc, dynamic="yes")  # type: ignore[arg-type]
    other = HSTUEncoder(CONFIG)
    other.blocks[1] = nn.Identity()
    with pytest.raises(TypeError, match="block 1 is a Identity"):
        compile_hstu_blocks(other)
    assert not any(is_compiled(b) for b in other.blocks if hasattr(b, "project"))  # nothing half-compiled
    assert None in COMPILE_MODES and "reduce-overhead" not in COMPILE_MODES


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("scope", "use_rab"),
    [("projections", False), ("block", False), ("block", True)],
    ids=["projections", "block", "block_rab"],
)
def test_cuda_bf16_autocast_compiled_equals_eager_without_recompiles(scope: str, use_rab: bool) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = HSTUConfig(embedding_dim=256, num_blocks=4, num_heads=2, max_seq_len=512, dropout=0.0, use_rab=use_rab)
    eager = HSTUEncoder(cfg).cuda()
    compiled = compile_hstu_blocks(copy.deepcopy(eager), scope=scope)
    names = [n for n, _ in eager.named_parameters()]
    g = torch.Generator().manual_seed(0)
    start = None
    for i in range(6):
        lengths = torch.randint(2, 513, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]).cuda()
        x = torch.randn(int(offsets[-1]), 256, device="cuda")
        ts = torch.arange(x.shape[0], device="cuda")
        outs = []
        for enc in (compiled, eager):
            enc.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = enc(xi, offsets, max(lengths), ts, ts)
            (y.float() * torch.linspace(-1.0, 2.0, y.numel(), device="cuda").reshape(y.shape)).sum().backward()
            outs.append((y.float(), xi.grad, [p.grad for p in enc.parameters()]))
        # "block" compiles once more at the first max_seq_len change (it turns symbolic); none after that.
        if i == (1 if scope == "block" else 0):
            start = _compile_counts()
        # bf16 matmuls, with Inductor's fused LayerNorm/SiLU rounding at other points than eager's: relative norms.
        (y_c, gx_c, gp_c), (y_e, gx_e, gp_e) = outs
        for what, a, b in [("output", y_c, y_e), ("input grad", gx_c, gx_e), *zip(names, gp_c, gp_e, strict=True)]:
            assert b.norm() > 0 and (a - b).norm() <= 2e-2 * b.norm(), (i, what, float((a - b).norm() / b.norm()))
    assert _delta(start) == {"frames": 0, "graphs": 0, "aot": 0, "breaks": 0}
