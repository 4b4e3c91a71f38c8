"""Length-aware data-parallel batches: each DP rank gets an equal share of a global batch's compute, not of its rows.

With jagged sequences a rank's step time grows with the sum of ``L_i^2`` of its sequences (attention) plus a term
linear in ``sum L_i`` (projections, MLP, embeddings). Splitting a shuffled global batch into contiguous chunks gives
each rank the same number of sequences but not the same cost, and every step waits for the slowest rank. Here a
global batch of ``world_size * batch_size`` sequences is partitioned so that the largest per-rank cost is as small as
a cheap heuristic gets it, keeping the per-rank sequence counts equal (within one when the batch is not a multiple of
the world size).

Cost of a sequence of length ``L``: ``L**2 + linear_coef * L``. For an HSTU layer of width ``d`` (``H * D = d``) the
causal attention forward is ``2 * d * L**2`` FLOPs (the convention of ``tools/bench_hstu_attention.py``) and the
dense part per token is ``8 * d**2`` (U/V/Q/K projection ``d -> 4d``) plus ``2 * d**2`` (output projection), so the
FLOP-proportional cost is ``L**2 + 5 * d * L``: :func:`hstu_linear_coef` returns that ``5 * d``. ``linear_coef=0``
balances attention alone.

Everything is a pure function of its inputs (NumPy, no torch.distributed, no global RNG): every rank computes the
same partition of the same global batch and keeps its own part, with no communication.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from gr_models.data import EpochBatchSampler

__all__ = [
    "LengthBalancedBatchSampler",
    "balanced_partition",
    "contiguous_partition",
    "hstu_linear_coef",
    "max_cost_lower_bound",
    "partition_costs",
    "sequence_costs",
]

# Pairwise-exchange rounds after the greedy pass, per sequence of the batch: the refinement normally stops far
# earlier (no improving exchange left); the cap bounds its time on adversarial inputs.
_REFINE_ROUNDS_PER_SEQUENCE = 2
# The refinement also stops once the heaviest rank is within this fraction of max_cost_lower_bound: no partition
# could be more than 0.01% better, far below step-time noise, and large batches skip rounds that gain nothing.
_REFINE_TOLERANCE = 1e-4


def hstu_linear_coef(dim: int) -> float:
    """``linear_coef`` that makes the cost proportional to one HSTU layer's FLOPs at width ``dim`` (see module doc)."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    return 5.0 * dim


def _as_lengths(lengths: Sequence[int] | np.ndarray | torch.Tensor, name: str = "lengths") -> np.ndarray:
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.detach().cpu().numpy()
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        bad = int(np.flatnonzero(arr < 0)[0])
        raise ValueError(f"{name} must be >= 0, got {name}[{bad}] = {int(arr[bad])}")
    return arr


def _check_linear_coef(linear_coef: float) -> float:
    coef = float(linear_coef)
    if not np.isfinite(coef) or coef < 0:
        raise ValueError(f"linear_coef must be finite and >= 0, got {linear_coef}")
    return coef


def sequence_costs(lengths: Sequence[int] | np.ndarray | torch.Tensor, linear_coef: float = 0.0) -> np.ndarray:
    """float64 cost ``L**2 + linear_coef * L`` of each sequence."""
    arr = _as_lengths(lengths).astype(np.float64)
    return arr * arr + _check_linear_coef(linear_coef) * arr


def partition_costs(
    lengths: Sequence[int] | np.ndarray | torch.Tensor, parts: Sequence[Sequence[int]], linear_coef: float = 0.0
) -> np.ndarray:
    """Total cost of each part (a list of positions into ``lengths``)."""
    cost = sequence_costs(lengths, linear_coef)
    return np.array([cost[np.asarray(p, dtype=np.int64)].sum() if len(p) else 0.0 for p in parts])


def _lower_bound(descending_costs: np.ndarray, world_size: int) -> float:
    c = descending_costs
    if len(c) == 0:
        return 0.0
    q = len(c) // world_size
    bound = max(c.sum() / world_size, c[0] + c[len(c) - q + 1 :].sum() if q >= 1 else c[0])
    if len(c) > world_size:
        bound = max(bound, c[world_size - 1] + c[world_size])
    return float(bound)


def max_cost_lower_bound(
    lengths: Sequence[int] | np.ndarray | torch.Tensor, world_size: int, linear_coef: float = 0.0
) -> float:
    """A value no count-balanced partition's max per-rank cost is below (to judge a partition by): the largest of the
    mean per-rank cost; the costliest sequence plus the ``q - 1`` cheapest others, since its rank holds at least
    ``q = n // world_size``; and, with more sequences than ranks, the ``world_size``-th plus the
    ``world_size + 1``-th costliest, two of which share a rank."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return _lower_bound(np.sort(sequence_costs(lengths, linear_coef))[::-1], world_size)


def _count_caps(n: int, world_size: int) -> tuple[int, int]:
    """(q, r): every rank gets q or q + 1 sequences, exactly r ranks get q + 1."""
    return n // world_size, n % world_size


def _greedy(cost: np.ndarray, world_size: int) -> list[list[int]]:
    """Longest-processing-time first with count caps: the costliest sequence goes to the cheapest rank that may still
    take one (the lowest rank on ties). A rank is full at q + 1 sequences, or at q once r ranks already hold q + 1."""
    q, r = _count_caps(len(cost), world_size)
    heap = [(0.0, k) for k in range(world_size)]  # (load, rank): sorted, so already a heap
    counts = [0] * world_size
    parts: list[list[int]] = [[] for _ in range(world_size)]
    ranks_at_q_plus_1 = 0
    values = cost.tolist()
    # Stable sort on -cost: equal costs keep their input order, so the result is reproducible everywhere.
    for i in np.argsort(-cost, kind="stable").tolist():
        while True:
            load, k = heapq.heappop(heap)
            # A rank dropped here is full for good: counts only grow and the cap only shrinks.
            if counts[k] < (q + 1 if ranks_at_q_plus_1 < r else q):
                break
        parts[k].append(i)
        counts[k] += 1
        if counts[k] == q + 1:
            ranks_at_q_plus_1 += 1
        else:
            heapq.heappush(heap, (load + values[i], k))
    return parts


def _best_exchange(ch: np.ndarray, cj: np.ndarray, load_h: float, load_j: float, may_move: bool):
    """Best single exchange between the heaviest rank h and rank j: swap ``ch[a]`` with ``cj[b]`` (or, when h holds
    one sequence more than j, move ``ch[a]`` to j). Returns (new max of the two loads, a, b or -1) or None.

    Moving ``d`` from h to j leaves ``max(load_h - d, load_j + d)``, V-shaped in ``d`` with its minimum at half the
    gap, so for each ``a`` only the two ``cj`` values nearest ``ch[a] - gap / 2`` (one per side) can be best:
    O(|h| log |j|) instead of the |h| x |j| table of every pair."""
    gap = load_h - load_j
    best = None
    if len(ch) and len(cj):
        order = np.argsort(cj, kind="stable")
        sorted_cj = cj[order]
        above = np.searchsorted(sorted_cj, ch - gap / 2)
        best_pair_max = np.full(len(ch), np.inf)
        best_b = np.zeros(len(ch), dtype=np.int64)
        for side in (above - 1, above):
            inside = (side >= 0) & (side < len(cj))
            b = np.clip(side, 0, len(cj) - 1)
            delta = ch - sorted_cj[b]  # load moved from h to j
            pair_max = np.maximum(load_h - delta, load_j + delta)
            pair_max[~inside | (delta <= 0) | (delta >= gap)] = np.inf
            better = pair_max < best_pair_max
            best_pair_max[better] = pair_max[better]
            best_b[better] = b[better]
        a = int(np.argmin(best_pair_max))
        if best_pair_max[a] < load_h:
            best = (float(best_pair_max[a]), a, int(order[best_b[a]]))
    if may_move and len(ch):
        pair_max = np.maximum(load_h - ch, load_j + ch)
        pair_max[(ch <= 0) | (ch >= gap)] = np.inf
        a = int(np.argmin(pair_max))
        if pair_max[a] < load_h and (best is None or pair_max[a] < best[0]):
            best = (float(pair_max[a]), a, -1)
    return best


def _refine(cost: np.ndarray, parts: list[list[int]], max_rounds: int) -> None:
    """Pairwise exchanges that lower the heaviest rank's load, in place, until none helps or that load is within
    ``_REFINE_TOLERANCE`` of the lower bound. Each accepted exchange moves 0 < d < (load gap) between two ranks, which
    strictly lowers the sum of squared loads, so this terminates."""
    world_size = len(parts)
    idx = [np.asarray(p, dtype=np.int64) for p in parts]
    loads = np.array([cost[p].sum() for p in idx])
    good_enough = _lower_bound(np.sort(cost)[::-1], world_size) * (1 + _REFINE_TOLERANCE)
    for _ in range(max_rounds):
        h = int(np.argmax(loads))
        if loads[h] <= good_enough:
            break
        best = None
        for j in range(world_size):
            if j == h or loads[j] >= loads[h]:
                continue
            found = _best_exchange(cost[idx[h]], cost[idx[j]], loads[h], loads[j], len(idx[h]) > len(idx[j]))
            if found is not None and (best is None or found[0] < best[0]):
                best = (*found, j)
        if best is None:
            break
        _, a, b, j = best
        moved = idx[h][a]
        if b >= 0:
            back = idx[j][b]
            idx[h][a], idx[j][b] = back, moved
            delta = cost[moved] - cost[back]
        else:
            idx[h] = np.delete(idx[h], a)
            idx[j] = np.append(idx[j], moved)
            delta = cost[moved]
        loads[h] -= delta
        loads[j] += delta
    for k in range(world_size):
        parts[k] = idx[k].tolist()


def balanced_partition(
    lengths: Sequence[int] | np.ndarray | torch.Tensor,
    world_size: int,
    *,
    linear_coef: float = 0.0,
    refine: bool = True,
) -> list[list[int]]:
    """Splits one global batch over ``world_size`` data-parallel ranks, balancing cost ``L**2 + linear_coef * L``.

    Returns ``parts``: ``parts[k]`` holds rank k's positions into ``lengths``, ascending. Every position appears
    exactly once; every rank gets ``len(lengths) // world_size`` or one more (ranks may get none when there are fewer
    sequences than ranks). The largest per-rank cost is minimised heuristically: greedy longest-first assignment
    under the count caps, then (``refine=True``) exchanges of one pair of sequences, or one move from a rank holding
    one more, between the heaviest rank and another, while that lowers the heaviest load and it is more than 0.01%
    above :func:`max_cost_lower_bound`. Deterministic: a pure function of its arguments.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, (int, np.integer)):
        raise TypeError(f"world_size must be an int, got {type(world_size).__name__}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    cost = sequence_costs(lengths, linear_coef)
    parts = _greedy(cost, int(world_size))
    if refine and world_size > 1:
        _refine(cost, parts, _REFINE_ROUNDS_PER_SEQUENCE * len(cost))
    return [sorted(p) for p in parts]


def contiguous_partition(n: int, world_size: int) -> list[list[int]]:
    """The length-blind split (what DistributedSampler-style sharding of a shuffled batch does): rank k gets the k-th
    contiguous chunk, chunk sizes equal within one. The baseline of the benchmark and tests."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    q, r = _count_caps(n, world_size)
    bounds = np.cumsum([0] + [q + (k < r) for k in range(world_size)])
    return [list(range(int(bounds[k]), int(bounds[k + 1]))) for k in range(world_size)]


class LengthBalancedBatchSampler:
    """Per-rank batches of dataset indices whose per-rank cost is balanced within each global batch.

    A ``batch_sampler`` for DataLoader (like ``gr_models.data.EpochBatchSampler``, sharded like DistributedSampler).
    Epoch ``e`` orders the dataset by ``np.random.default_rng([seed, e]).permutation(n)`` (``0..n-1`` without
    shuffling), the same on every rank; consecutive chunks of ``world_size * batch_size`` indices are global
    batches, and each is split by :func:`balanced_partition`; this rank yields its part (dataset indices in the
    epoch's order). Every rank yields the same number of batches, each of ``batch_size`` indices but the last.

    The last global batch may be short: with ``drop_last`` it is dropped; otherwise it is padded (as
    DistributedSampler pads) with indices from the start of the epoch's order up to a multiple of ``world_size``, so
    every rank gets the same number of sequences and none an empty batch; those few sequences are seen twice.

    ``lengths[i]`` is the length dataset item ``i`` will have in the model (after truncation), e.g. for
    ``NextItemTrainDataset`` ``np.minimum(ds.sequences.lengths[ds.positions] - 1, ds.max_seq_len)``.
    ``start_batch`` skips the first batches of the epoch (a run resumed mid-epoch); ``set_epoch`` resets it.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray | torch.Tensor,
        batch_size: int,
        *,
        world_size: int,
        rank: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        linear_coef: float = 0.0,
        start_batch: int = 0,
    ) -> None:
        for name, value in (("batch_size", batch_size), ("world_size", world_size), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.lengths = _as_lengths(lengths)
        if len(self.lengths) == 0:
            raise ValueError("LengthBalancedBatchSampler needs at least one example, got no lengths")
        self.global_batch_size = world_size * batch_size
        if drop_last and len(self.lengths) < self.global_batch_size:
            raise ValueError(
                f"drop_last with {len(self.lengths)} examples and a global batch of world_size * batch_size = "
                f"{self.global_batch_size} would yield no batch"
            )
        self.batch_size = int(batch_size)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.seed = seed
        self.linear_coef = _check_linear_coef(linear_coef)
        # The epoch's order and its cut into global batches are gr-models' (the same order a single process serves).
        self._epochs = EpochBatchSampler(len(self.lengths), self.global_batch_size, shuffle=shuffle, seed=seed,
                                         drop_last=drop_last, start_batch=start_batch)  # fmt: skip

    @property
    def epoch(self) -> int:
        return self._epochs.epoch

    @property
    def start_batch(self) -> int:
        return self._epochs.start_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epochs.set_epoch(epoch, start_batch)

    def order(self) -> np.ndarray:
        """Dataset indices of the current epoch, in order (before the split over ranks)."""
        return self._epochs.order()

    def __len__(self) -> int:
        return len(self._epochs)

    def global_batches(self) -> Iterator[np.ndarray]:
        """The epoch's global batches (dataset indices, padded last batch included), from ``start_batch`` on."""
        for indices in self._epochs:
            batch = np.asarray(indices, dtype=np.int64)
            short = -len(batch) % self.world_size
            if short:  # only the last batch, without drop_last: pad from the start of the epoch
                batch = np.concatenate([batch, np.resize(self.order(), short)])
            yield batch

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            parts = balanced_partition(self.lengths[batch], self.world_size, linear_coef=self.linear_coef)
            yield batch[parts[self.rank]].tolist()
