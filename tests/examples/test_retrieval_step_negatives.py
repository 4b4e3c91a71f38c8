"""The negatives a fused item table's one-lookup step draws before the step (``draw_step_negatives``): every DP rank
of any split of a global batch draws its rows of the one-process draw; a rank whose batch does not match its plan is
refused. ``distinct_negatives`` lays the distinct ids out for the one lookup and indexes the draws into them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from examples.common.distributed import StepPlan
from examples.retrieval.trainer import GlobalBatchSampledSoftmax, distinct_negatives, step_generator


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=9),
    dp=st.integers(1, 4),
    balanced=st.booleans(),
    negatives=st.sampled_from(["uniform", "in_batch"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_each_rank_draws_its_rows_of_the_one_process_draw(
    lengths: list[int], dp: int, balanced: bool, negatives: str, seed: int
) -> None:
    """``draw_step_negatives`` on every DP rank of any split of a global batch: the ranks' negatives, put back at
    their token rows, are the draw one process makes for the whole batch from the same seed."""
    from gr_parallel.load_balance import balanced_partition, contiguous_partition

    if len(lengths) < dp:
        dp = len(lengths)
    loss = GlobalBatchSampledSoftmax(50, num_negatives=3, negatives=negatives)  # type: ignore[arg-type]
    lens = np.asarray(lengths, dtype=np.int64)
    total = int(lens.sum())
    global_targets = torch.randint(50, (total,), generator=torch.Generator().manual_seed(seed + 1))
    want, positions = loss.draw_step_negatives(global_targets, None, torch.Generator().manual_seed(seed), None)  # type: ignore[arg-type]
    assert want.shape == (total, 3) and ((want >= 0) & (want < 50)).all()
    if negatives == "in_batch":
        assert positions is not None and torch.equal(want, global_targets[positions])
    split = balanced_partition(lens, dp) if balanced else contiguous_partition(len(lens), dp)
    parts = tuple(np.asarray(p, dtype=np.int64) for p in split)
    got = torch.full_like(want, -1)
    for r in range(dp):
        plan = StepPlan(np.arange(len(lens)), parts, lens, r)
        rows = torch.from_numpy(plan.token_rows())
        ids, pos = loss.draw_step_negatives(
            global_targets[rows], plan, torch.Generator().manual_seed(seed), lambda: global_targets
        )
        assert (pos is None) == (dp > 1 or negatives == "uniform")
        got[rows] = ids
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_rank_whose_targets_are_not_at_its_rows_is_refused() -> None:
    loss = GlobalBatchSampledSoftmax(50, num_negatives=3, negatives="in_batch")
    lens = np.asarray([2, 3], dtype=np.int64)
    plan = StepPlan(np.arange(2), (np.asarray([0]), np.asarray([1])), lens, 0)
    targets = torch.arange(5)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(RuntimeError, match="do not hold this rank's targets"):
        loss.draw_step_negatives(torch.tensor([7, 7]), plan, g, lambda: targets)
    with pytest.raises(RuntimeError, match="has 3 target positions but its plan says 2"):
        loss.draw_step_negatives(torch.arange(3), plan, g, lambda: targets)


def test_step_generator_is_a_function_of_the_batch_place() -> None:
    def draw(*place: int) -> torch.Tensor:
        return torch.randint(1000, (8,), generator=step_generator(*place))

    assert torch.equal(draw(7, 1, 3), draw(7, 1, 3))
    for other in [(8, 1, 3), (7, 2, 3), (7, 1, 4)]:
        assert not torch.equal(draw(7, 1, 3), draw(*other)), other
    before = torch.get_rng_state()
    draw(7, 1, 3)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG (dropout) is not touched


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 9), items=st.integers(1, 500), seed=st.integers(0, 2**31 - 1))
def test_distinct_negatives_hold_each_id_once_and_index_every_draw(n: int, k: int, items: int, seed: int) -> None:
    negatives = torch.randint(items, (n, k), generator=torch.Generator().manual_seed(seed))
    distinct, index = distinct_negatives(negatives)
    ids = negatives.unique()
    cols = -(-ids.numel() // n)
    assert distinct.shape == (n, cols) and index.shape == negatives.shape
    flat = distinct.flatten()
    assert torch.equal(flat[: ids.numel()], ids)  # each distinct id once, first; the rest repeats them
    assert torch.equal(flat, ids[torch.arange(n * cols) % ids.numel()])
    assert int(index.max()) < ids.numel() and torch.equal(flat[index], negatives)
