"""Length-aware DP batches: the partition is exact and count-balanced, near-optimal on tiny inputs, better balanced
than the contiguous split on skewed lengths; the sampler covers every global batch once with equal batch counts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from gr_parallel import (
    LengthBalancedBatchSampler,
    balanced_partition,
    contiguous_partition,
    hstu_linear_coef,
    max_cost_lower_bound,
    partition_costs,
    sequence_costs,
)

lengths_st = st.lists(st.integers(0, 5000), min_size=0, max_size=200)
coef_st = st.sampled_from([0.0, 1.0, hstu_linear_coef(512)])


def check_partition(parts: list[list[int]], n: int, world_size: int) -> None:
    assert len(parts) == world_size
    assert sorted(itertools.chain.from_iterable(parts)) == list(range(n))  # every position exactly once
    q, r = divmod(n, world_size)
    counts = [len(p) for p in parts]
    assert all(c in (q, q + 1) for c in counts), counts
    assert sum(c == q + 1 for c in counts) == r
    assert all(p == sorted(p) for p in parts)


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_st, world_size=st.integers(1, 9), coef=coef_st)
def test_partition_is_exact_count_balanced_and_deterministic(lengths, world_size, coef) -> None:
    parts = balanced_partition(lengths, world_size, linear_coef=coef)
    check_partition(parts, len(lengths), world_size)
    # Same answer again and from every accepted container (ranks must agree without talking).
    assert balanced_partition(lengths, world_size, linear_coef=coef) == parts
    assert balanced_partition(np.array(lengths, dtype=np.int32), world_size, linear_coef=coef) == parts
    assert balanced_partition(torch.tensor(lengths, dtype=torch.int64), world_size, linear_coef=coef) == parts


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_st, world_size=st.integers(2, 9), coef=coef_st)
def test_refinement_never_raises_the_max_and_respects_the_lower_bound(lengths, world_size, coef) -> None:
    refined = partition_costs(lengths, balanced_partition(lengths, world_size, linear_coef=coef), coef).max(initial=0)
    greedy_parts = balanced_partition(lengths, world_size, linear_coef=coef, refine=False)
    check_partition(greedy_parts, len(lengths), world_size)
    greedy = partition_costs(lengths, greedy_parts, coef).max(initial=0)
    assert refined <= greedy
    assert refined >= max_cost_lower_bound(lengths, world_size, coef) * (1 - 1e-12)


def brute_force_max_cost(lengths: list[int], world_size: int) -> float:
    """Smallest possible max per-rank cost over every count-balanced assignment (world_size ** n labelings)."""
    cost = sequence_costs(lengths)
    q, r = divmod(len(lengths), world_size)
    labels = np.array(list(itertools.product(range(world_size), repeat=len(lengths))))
    onehot = labels[:, :, None] == np.arange(world_size)
    counts = onehot.sum(1)
    valid = ((counts == q) | (counts == q + 1)).all(1) & ((counts == q + 1).sum(1) == r)
    loads = (onehot[valid] * cost[None, :, None]).sum(1)
    return float(loads.max(1).min())


# The classic LPT bound for identical machines is 4/3; with refinement the worst ratio seen in 3000 random tiny
# cases was 1.034, so 4/3 is a safe, stated factor.
OPTIMALITY_FACTOR = 4 / 3


@settings(max_examples=80, deadline=None)
@given(data=st.data(), world_size=st.integers(2, 3))
def test_near_optimal_against_brute_force(data, world_size) -> None:
    lengths = data.draw(st.lists(st.integers(0, 64), min_size=1, max_size=8 if world_size == 2 else 7))
    best = brute_force_max_cost(lengths, world_size)
    got = partition_costs(lengths, balanced_partition(lengths, world_size)).max()
    assert got <= OPTIMALITY_FACTOR * best + 1e-9, (lengths, got, best)
    assert max_cost_lower_bound(lengths, world_size) <= best  # the bound the skewed-lengths test relies on


def test_refinement_reaches_the_optimum_where_greedy_does_not() -> None:
    # Costs 100, 64, 36, 36, 25, 1 over 2 ranks of 3: greedy gives {100, 36, 1} = 137 vs {64, 36, 25} = 125; the
    # optimum is {64, 36, 36} = 136 vs {100, 25, 1} = 126, one swap (36 <-> 25) away.
    lengths = [10, 8, 6, 6, 5, 1]
    best = brute_force_max_cost(lengths, 2)
    greedy = partition_costs(lengths, balanced_partition(lengths, 2, refine=False)).max()
    refined = partition_costs(lengths, balanced_partition(lengths, 2)).max()
    assert (greedy, refined, best) == (137, 136, 136)


def power_law_lengths(rng: np.random.Generator, n: int, exponent: float = 1.5, max_len: int = 4096) -> np.ndarray:
    """Lengths in [1, max_len] with density proportional to L**-exponent (inverse CDF)."""
    u = rng.random(n)
    return np.floor((1 - u * (1 - max_len ** (1 - exponent))) ** (1 / (1 - exponent))).astype(np.int64)


@pytest.mark.parametrize("world_size, batch_size", [(4, 32), (8, 16)])
def test_balanced_beats_contiguous_split_on_skewed_lengths(world_size, batch_size) -> None:
    rng = np.random.default_rng(7)
    balanced, naive, bound = [], [], []
    for _ in range(40):
        lengths = power_law_lengths(rng, world_size * batch_size)
        cost = sequence_costs(lengths)
        mean = cost.sum() / world_size
        balanced.append(partition_costs(lengths, balanced_partition(lengths, world_size)).max() / mean)
        naive.append(partition_costs(lengths, contiguous_partition(len(lengths), world_size)).max() / mean)
        bound.append(max_cost_lower_bound(lengths, world_size) / mean)
    assert np.mean(balanced) < np.mean(naive)
    assert all(b <= n for b, n in zip(balanced, naive, strict=True))
    assert max(b / lb for b, lb in zip(balanced, bound, strict=True)) <= 1.01


def all_ranks(n: int, world_size: int, batch_size: int, **kw) -> list[LengthBalancedBatchSampler]:
    lengths = np.random.default_rng(n).integers(1, 300, n)
    return [
        LengthBalancedBatchSampler(lengths, batch_size, world_size=world_size, rank=k, **kw) for k in range(world_size)
    ]


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 150),
    world_size=st.integers(1, 5),
    batch_size=st.integers(1, 8),
    drop_last=st.booleans(),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 5),
)
def test_sampler_ranks_cover_each_global_batch_once(n, world_size, batch_size, drop_last, shuffle, seed, epoch):
    if drop_last and n < world_size * batch_size:
        with pytest.raises(ValueError, match="would yield no batch"):
            all_ranks(n, world_size, batch_size, drop_last=True)
        return
    samplers = all_ranks(n, world_size, batch_size, drop_last=drop_last, shuffle=shuffle, seed=seed)
    for s in samplers:
        s.set_epoch(epoch)
    per_rank = [list(s) for s in samplers]
    globals_ = list(samplers[0].global_batches())
    assert all(len(batches) == len(samplers[0]) == len(globals_) for batches in per_rank)
    for b, global_batch in enumerate(globals_):
        shares = [batches[b] for batches in per_rank]
        assert sorted(itertools.chain.from_iterable(shares)) == sorted(global_batch.tolist())
        assert len({len(s) for s in shares}) == 1 and shares[0]  # same count, none empty
        if len(global_batch) == world_size * batch_size:
            assert len(shares[0]) == batch_size
    # The epoch's order, cut into global batches, is what the ranks share (padding only after the order's end).
    served = np.concatenate(globals_)[: min(n, len(globals_) * world_size * batch_size)]
    assert served.tolist() == samplers[0].order()[: len(served)].tolist()
    if not drop_last:
        assert set(served.tolist()) == set(range(n))


def test_sampler_shares_are_the_balanced_partition() -> None:
    samplers = all_ranks(100, 4, 8, seed=3)
    for b, batch in enumerate(samplers[0].global_batches()):
        parts = balanced_partition(samplers[0].lengths[batch], 4)
        for k, s in enumerate(samplers):
            assert list(s)[b] == batch[parts[k]].tolist()


def test_set_epoch_reshuffles_and_is_reproducible() -> None:
    (s,) = all_ranks(64, 1, 8, seed=5)
    epoch0 = list(s)
    s.set_epoch(1)
    epoch1 = list(s)
    assert epoch1 != epoch0
    assert sorted(itertools.chain.from_iterable(epoch1)) == list(range(64))
    s.set_epoch(0)
    assert list(s) == epoch0
    s.set_epoch(0, start_batch=3)
    assert list(s) == epoch0[3:]
    (other_seed,) = all_ranks(64, 1, 8, seed=6)
    assert list(other_seed) != epoch0


def test_sampler_drives_a_dataloader() -> None:
    sampler = all_ranks(40, 2, 4, seed=1)[1]
    loader = DataLoader(list(range(40)), batch_sampler=sampler, collate_fn=list)
    assert list(loader) == list(sampler)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"world_size": 0, "rank": 0}, ValueError, "world_size must be >= 1"),
        ({"world_size": 2, "rank": 2}, ValueError, r"rank must be in \[0, world_size=2\)"),
        ({"world_size": 2, "rank": -1}, ValueError, "rank must be in"),
        ({"world_size": 2, "rank": 0, "batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"world_size": 2, "rank": 0, "lengths": [3, -1]}, ValueError, r"lengths must be >= 0, got lengths\[1\] = -1"),
        ({"world_size": 2, "rank": 0, "lengths": []}, ValueError, "at least one example"),
        ({"world_size": 2, "rank": 0, "lengths": [1.5, 2.0]}, TypeError, "lengths must be integers"),
        ({"world_size": 2, "rank": 0, "lengths": [[1, 2]]}, ValueError, "one-dimensional"),
        ({"world_size": 2, "rank": 0, "linear_coef": -1.0}, ValueError, "linear_coef must be finite and >= 0"),
        ({"world_size": 2.0, "rank": 0}, TypeError, "world_size must be an int"),
        ({"world_size": 2, "rank": 0, "seed": -1}, ValueError, "seed must be >= 0"),
    ],
)
def test_sampler_rejects_bad_input(kwargs, error, match) -> None:
    args = {"lengths": [1, 2, 3, 4], "batch_size": 2, **kwargs}
    with pytest.raises(error, match=match):
        LengthBalancedBatchSampler(args.pop("lengths"), args.pop("batch_size"), **args)


def test_partition_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        balanced_partition([1, 2], 0)
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        balanced_partition([1, -2], 2)
    with pytest.raises(ValueError, match="linear_coef"):
        balanced_partition([1, 2], 2, linear_coef=float("nan"))
    with pytest.raises(ValueError, match="start_batch must be >= 0"):
        s = all_ranks(8, 1, 2)[0]
        s.set_epoch(0, start_batch=-1)
        list(s)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        all_ranks(8, 1, 2)[0].set_epoch(-1)
    with pytest.raises(ValueError, match="dim must be >= 1"):
        hstu_linear_coef(0)


def test_sampler_serves_gr_models_jagged_batches() -> None:
    """The lengths recipe of the sampler's docstring matches what gr-models' collate produces, and make_dataloader
    accepts the sampler in place of its EpochBatchSampler."""
    from gr_models.data import NextItemTrainDataset, UserSequences, make_dataloader

    rng = np.random.default_rng(0)
    seq_lengths = rng.integers(1, 60, 50)
    offsets = np.concatenate([[0], np.cumsum(seq_lengths)]).astype(np.int64)
    total = int(offsets[-1])
    sequences = UserSequences(
        users=np.arange(50, dtype=np.int64),
        offsets=offsets,
        items=rng.integers(0, 100, total).astype(np.int64),
        timestamps=np.arange(total, dtype=np.int64),
        ratings=None,
        num_items=100,
    )
    dataset = NextItemTrainDataset(sequences, max_seq_len=32)
    lengths = np.minimum(dataset.sequences.lengths[dataset.positions] - 1, dataset.max_seq_len)
    per_rank = []
    for rank in range(2):
        sampler = LengthBalancedBatchSampler(lengths, 6, world_size=2, rank=rank, seed=4)
        batches = list(make_dataloader(dataset, sampler))
        assert [b.features.lengths().tolist() for b in batches] == [lengths[i].tolist() for i in sampler]
        per_rank.append([int((b.features.lengths() ** 2).sum()) for b in batches])
    global_batches = list(sampler.global_batches())
    assert [a + b for a, b in zip(*per_rank, strict=True)] == [int(np.sum(lengths[g] ** 2)) for g in global_batches]
    naive = [partition_costs(lengths[g], contiguous_partition(len(g), 2)).max() for g in global_batches]
    assert sum(max(a, b) for a, b in zip(*per_rank, strict=True)) < sum(naive)  # the slowest rank, summed over steps
