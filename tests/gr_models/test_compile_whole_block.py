"""compile_hstu_blocks(scope="block"): each HSTU block's whole forward (the attention op inside) as one compiled graph
equals the eager blocks (outputs, input and every parameter gradient) on jagged batches of any size, with and without
the relative attention bias; one graph serves every block and, after the first change of max_seq_len, every batch;
the op's offset checks still raise (run eagerly before the graph); attention dropout works across its graph break.

Compiles are counted with Dynamo's global counters (see test_compile_blocks.py): ``frames/total`` (frames Dynamo
compiled, i.e. first compiles and recompiles), ``stats/unique_graphs``, ``aot_autograd/total``, ``graph_break``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gr_models.modules import HSTUConfig, HSTUEncoder, compile_hstu_blocks, uncompile_hstu_blocks
from gr_models.modules.compile import SCOPES, compiled_scope, is_compiled
from tests.gr_models.compile_helpers import (
    assert_passes_equal,
    compile_counts,
    counts_since,
    jagged_batch,
    train_pass,
)

DIM = 16
MAX_LEN = 40


def _config(use_rab: bool, **kw) -> HSTUConfig:
    return HSTUConfig(
        embedding_dim=DIM, num_blocks=2, num_heads=2, max_seq_len=MAX_LEN, dropout=0.0, use_rab=use_rab, **kw
    )


_compile_counts, _delta = compile_counts, counts_since


def _batch(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    return jagged_batch(lengths, seed, DIM)


_train_pass, _assert_passes_equal = train_pass, assert_passes_equal


@pytest.fixture(scope="module", params=[False, True], ids=["no_rab", "rab"])
def pair(request: pytest.FixtureRequest) -> dict:
    """An eager encoder and a whole-block compiled copy (same weights), warmed up on two training batches with
    different token counts, batch sizes and max_seq_len (the compile counts of each)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = HSTUEncoder(_config(request.param)).train()
    compiled = compile_hstu_blocks(copy.deepcopy(eager), scope="block")
    warmup = []
    for lengths, seed in (([5, 9, 3], 0), ([7, 2, 21, 4], 1)):
        before = _compile_counts()
        batch = _batch(lengths, seed)
        _assert_passes_equal(_train_pass(compiled, batch), _train_pass(eager, batch))
        warmup.append(_delta(before))
    return {"eager": eager, "compiled": compiled, "warmup": warmup, "use_rab": request.param}


def test_one_graph_for_all_blocks_dynamic_after_the_first_max_seq_len_change(pair: dict) -> None:
    assert all(compiled_scope(b) == "block" for b in pair["compiled"].blocks)
    # Batch 1: one frame, graph and AOTAutograd forward+backward for both blocks (no graph break: the attention op
    # is inside). Batch 2 changes max_seq_len (a Python int, first compiled as a constant; 9 -> 21, with the bias
    # padded to 16 -> 24): one recompile with it symbolic, after which nothing compiles again (next test).
    one = {"frames": 1, "graphs": 1, "aot": 1, "breaks": 0}
    assert pair["warmup"] == [one, one]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(0, MAX_LEN), min_size=1, max_size=7), seed=st.integers(0, 2**16))
def test_compiled_block_equals_eager_and_never_recompiles(pair: dict, lengths: list[int], seed: int) -> None:
    # Any batch size (empty sequences included), any max_seq_len up to the model's (e.g. 29, 37: multiples of
    # nothing), any token count: no new frame, graph, AOTAutograd compile or graph break. Torch specialises a size
    # of 0 or 1 (one token in total; max_seq_len 1 without the bias, which pads it to 8; one sequence with the bias,
    # [1, 1, L, L]): one more graph each, test_single_token_sequences.
    assume(sum(lengths) >= 2 and max(lengths) >= 2 and (len(lengths) >= 2 or not pair["use_rab"]))
    batch = _batch(lengths, seed)
    before = _compile_counts()
    got = _train_pass(pair["compiled"], batch)
    assert _delta(before) == {"frames": 0, "graphs": 0, "aot": 0, "breaks": 0}
    _assert_passes_equal(got, _train_pass(pair["eager"], batch))


@pytest.mark.parametrize("lengths", [[1], [1, 1, 1], [0, 1]])
def test_single_token_sequences(pair: dict, lengths: list[int]) -> None:
    batch = _batch(lengths, seed=7)
    _assert_passes_equal(_train_pass(pair["compiled"], batch), _train_pass(pair["eager"], batch))


def test_targets_and_context_reach_the_graph(pair: dict) -> None:
    batch = _batch([6, 13, 9], seed=11)
    kw = {"num_targets": torch.tensor([2, 0, 3]), "contextual_seq_len": 2}
    _assert_passes_equal(_train_pass(pair["compiled"], batch, **kw), _train_pass(pair["eager"], batch, **kw))


def test_bad_offsets_still_raise_once_per_forward(pair: dict) -> None:
    # The op skips its value checks inside a graph; the compiled block runs them eagerly first (block 0).
    compiled = pair["compiled"]
    x, offsets, _, ts = _batch([6, 10], seed=3)
    with pytest.raises(ValueError, match="max_seq_len"):
        compiled(x, offsets, 8, ts, ts + 5)
    with pytest.raises(ValueError, match="seq_offsets must start at 0"):
        compiled(x, offsets + 1, 16, ts, ts + 5)
    bad_order = torch.tensor([0, 12, 4, 16])
    x3 = torch.randn(16, DIM)
    ts3 = torch.arange(16)
    with pytest.raises(ValueError, match="non-decreasing"):
        compiled(x3, bad_order, 16, ts3, ts3)
    with pytest.raises(ValueError, match="num_targets"):
        compiled(x, offsets, 16, ts, ts + 5, num_targets=torch.tensor([7, 0]))
    # A block called on its own with validate=True checks too; validate=False trusts the caller.
    block = compiled.blocks[1]
    with pytest.raises(ValueError, match="max_seq_len"):
        block(x, offsets, 8, None)
    # The error left nothing behind: good batches still run without compiling.
    before = _compile_counts()
    _train_pass(compiled, _batch([6, 10], seed=3))
    assert _delta(before)["frames"] == 0


def test_no_grad_inference(pair: dict) -> None:
    eager, compiled = pair["eager"].eval(), pair["compiled"].eval()
    try:
        with torch.no_grad():
            for i, lengths in enumerate([[4, 7], [1, 2, 3, 30], [16]]):
                x, offsets, max_len, ts = _batch(lengths, seed=100 + i)
                got = compiled(x, offsets, max_len, ts, ts + 5)
                torch.testing.assert_close(got, eager(x, offsets, max_len, ts, ts + 5), rtol=1e-5, atol=1e-5)
    finally:
        eager.train(), compiled.train()


def test_attention_dropout_across_its_graph_break() -> None:
    # The op draws its dropout seed as a Python int from the CPU generator: a graph break around which the block
    # runs as two graphs; under one torch.manual_seed eager and compiled draw the same seed, hence the same masks.
    torch.manual_seed(2)
    eager = HSTUEncoder(_config(False, attn_dropout=0.3)).train()
    compiled = compile_hstu_blocks(copy.deepcopy(eager), scope="block", backend="aot_eager")
    before = _compile_counts()
    for lengths, seed in (([5, 9, 3], 0), ([12, 2], 1)):
        batch = _batch(lengths, seed)
        torch.manual_seed(seed)
        got = _train_pass(compiled, batch)
        assert _delta(before)["breaks"] >= 1  # the seed draw split the block
        torch.manual_seed(seed)
        want = _train_pass(eager, batch)
        _assert_passes_equal(got, want)
    torch.manual_seed(5)
    other = _train_pass(compiled, _batch([12, 2], 1))
    assert not torch.allclose(other[0], got[0]), "dropout masks did not change with the seed"


def test_scopes_switch_and_uncompile() -> None:
    enc = HSTUEncoder(_config(True))
    names = list(enc.state_dict())
    compile_hstu_blocks(enc, scope="block", backend="aot_eager")
    assert [compiled_scope(b) for b in enc.blocks] == ["block", "block"] and list(enc.state_dict()) == names
    assert "project" not in vars(enc.blocks[0]) and "forward" in vars(enc.blocks[0])
    # Compiling again with the other scope replaces the first: never both at once.
    compile_hstu_blocks(enc, scope="projections", backend="aot_eager")
    assert [compiled_scope(b) for b in enc.blocks] == ["projections", "projections"]
    assert "forward" not in vars(enc.blocks[0])
    copied = copy.deepcopy(compile_hstu_blocks(enc, scope="block", backend="aot_eager"))
    assert copied.blocks[0].forward.block is copied.blocks[0]
    uncompile_hstu_blocks(enc)
    assert not any(is_compiled(b) for b in enc.blocks) and not vars(enc.blocks[0]).keys() & set(SCOPES["block"])
    with pytest.raises(ValueError, match="scope must be one of"):
        compile_hstu_blocks(enc, scope="whole")
    assert not any(is_compiled(b) for b in enc.blocks)
