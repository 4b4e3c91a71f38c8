"""What the example trainers need to run under torchrun: when to go distributed, layout checks with clear errors,
data-parallel batches that remember their place in the global batch, and collectives on uneven tensors.

The layout is gr-parallel's (``gr_parallel.initialize``): ``world = tp * dp``; the ranks of one tensor-parallel
group read the same local batch, the ``dp`` data-parallel groups read different parts of each GLOBAL batch of
``train.batch_size`` sequences. Every global batch is the one a single process trains at the same step, so losses
normalised by the global count give the single-process gradients.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from examples.common.config import ConfigError
from examples.common.sections import ParallelConfig


def launched_world_size() -> int:
    """The world size torchrun (or any launcher setting ``WORLD_SIZE``) gave this process; 1 without one."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(raw)
    except ValueError as e:
        raise ValueError(f"environment variable WORLD_SIZE must be an integer, got {raw!r}") from e
    if size < 1:
        raise ValueError(f"environment variable WORLD_SIZE must be >= 1, got {size}")
    return size


def wants_distributed(pc: ParallelConfig) -> bool:
    """True under a multi-process launch or with ``parallel.tp > 1`` (which needs one; see ``check_layout``)."""
    return launched_world_size() > 1 or pc.tp > 1


class ParallelLayoutError(ConfigError):
    """The config cannot be laid out over the launched ranks; the message names the key to change (the CLI prints
    it as a config error: ``error: ...``, exit status 2 on every rank)."""


def check_layout(
    pc: ParallelConfig,
    world_size: int,
    *,
    batch_size: int,
    eval_batch_size: int,
    num_heads: int | None,
    encoder: str = "hstu",
) -> int:
    """Checks that ``pc`` fits ``world_size`` ranks and the model; returns the data-parallel size.

    ``num_heads`` is the HSTU blocks' head count (None: the model has no HSTU blocks to split).
    """
    if world_size % pc.tp:
        raise ParallelLayoutError(
            f"parallel.tp={pc.tp} does not divide the world size {world_size} (torchrun --nproc-per-node x nodes); "
            f"launch a multiple of {pc.tp} processes or change --tp"
        )
    if pc.tp > 1:
        if encoder != "hstu" or num_heads is None:
            raise ParallelLayoutError(
                f"parallel.tp={pc.tp} splits HSTU blocks by heads, but this model has none (encoder {encoder!r}); "
                "use --tp 1 (data parallel only)"
            )
        if num_heads % pc.tp:
            raise ParallelLayoutError(
                f"parallel.tp={pc.tp} must divide model.hstu.num_heads={num_heads} (each rank keeps whole heads)"
            )
    dp = world_size // pc.tp
    if batch_size % dp:
        raise ParallelLayoutError(
            f"train.batch_size={batch_size} is the global batch and must be divisible by the data-parallel size "
            f"{dp} (world {world_size} / tp {pc.tp})"
        )
    if eval_batch_size % dp:
        raise ParallelLayoutError(
            f"train.eval_batch_size={eval_batch_size} must be divisible by the data-parallel size {dp} "
            f"(world {world_size} / tp {pc.tp})"
        )
    return dp


def check_launched(pc: ParallelConfig) -> None:
    """``tp > 1`` in a single process has no ranks to split over: say how to launch instead of failing later."""
    world = launched_world_size()
    if pc.tp > 1 and world == 1 and not dist.is_initialized():
        raise ParallelLayoutError(
            f"parallel.tp={pc.tp} needs {pc.tp} processes: launch with "
            f"`torchrun --nproc-per-node {pc.tp} -m <trainer> ... --tp {pc.tp}`"
        )


@dataclass(frozen=True)
class StepPlan:
    """Where this rank's batch sits in the global batch of one step.

    ``global_indices``: dataset indices of the global batch in single-process order; ``parts[r]``: positions into
    it that DP rank ``r`` trains (ascending); ``lengths``: tokens per global-batch sequence.
    """

    global_indices: np.ndarray
    parts: tuple[np.ndarray, ...]
    lengths: np.ndarray
    dp_rank: int

    @property
    def local_positions(self) -> np.ndarray:
        return self.parts[self.dp_rank]

    def token_rows(self, rank: int | None = None) -> np.ndarray:
        """Rows of DP rank ``rank`` (default: this one) in the global batch's token layout (sequences
        concatenated in single-process order), in the order the rank's collated batch holds them."""
        positions = self.parts[self.dp_rank if rank is None else rank]
        starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        return np.concatenate(
            [np.arange(starts[p], starts[p] + self.lengths[p], dtype=np.int64) for p in positions]
            or [np.zeros(0, dtype=np.int64)]
        )

    @property
    def global_tokens(self) -> int:
        return int(self.lengths.sum())


class DataParallelBatchSampler:
    """This DP rank's part of every global batch (a DataLoader ``batch_sampler`` with ``EpochBatchSampler``'s
    ``set_epoch``/``start_batch``/``len``), remembering each step's ``StepPlan`` in ``plan``.

    The global batches are ``gr_parallel.LengthBalancedBatchSampler``'s (gr-models' epoch order, cut every
    ``dp * per_rank_batch``); each is split by ``balanced_partition`` (``load_balance``: equal sum of ``L**2`` per
    rank) or into contiguous chunks. ``lengths[i]`` is dataset item i's token count in the model. The epoch's short
    last batch is split as it is (uneven counts), so every epoch trains exactly the single-process batches.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        global_batch_size: int,
        *,
        dp_size: int,
        dp_rank: int,
        seed: int,
        load_balance: bool,
        linear_coef: float = 0.0,
    ) -> None:
        from gr_parallel.load_balance import LengthBalancedBatchSampler

        if global_batch_size % dp_size:
            raise ParallelLayoutError(f"global batch {global_batch_size} is not divisible by dp={dp_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.dp_size, self.dp_rank = dp_size, dp_rank
        self.load_balance, self.linear_coef = load_balance, linear_coef
        self.seed = seed
        self._global = LengthBalancedBatchSampler(
            self.lengths,
            global_batch_size // dp_size,
            world_size=dp_size,
            rank=dp_rank,
            seed=seed,
            shuffle=True,
            linear_coef=linear_coef,
        )
        self.plan: StepPlan | None = None

    @property
    def epoch(self) -> int:
        return self._global.epoch

    @property
    def start_batch(self) -> int:
        return self._global.start_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self._global.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self._global)

    def _split(self, lengths: np.ndarray) -> list[list[int]]:
        from gr_parallel.load_balance import balanced_partition, contiguous_partition

        if self.load_balance:
            return balanced_partition(lengths, self.dp_size, linear_coef=self.linear_coef)
        return contiguous_partition(len(lengths), self.dp_size)

    def __iter__(self) -> Iterator[list[int]]:
        n, size = len(self.lengths), self._global.global_batch_size
        for b, batch in enumerate(self._global.global_batches(), start=self.start_batch):
            real = min(size, n - b * size)
            if real >= self.dp_size:
                # A short last batch is split unevenly (counts differ by one) rather than padded with repeated
                # sequences: the loss is normalised by the global count, so this trains what one process trains.
                # Only a last batch with fewer sequences than ranks keeps the sampler's padding (no rank idles).
                batch = batch[:real]
            lengths = self.lengths[batch]
            parts = tuple(np.asarray(p, dtype=np.int64) for p in self._split(lengths))
            self.plan = StepPlan(batch, parts, lengths, self.dp_rank)
            yield batch[parts[self.dp_rank]].tolist()


def strided_shard(n: int, dp_size: int, dp_rank: int) -> tuple[np.ndarray, int]:
    """Evaluation shard of DP rank ``dp_rank``: items ``rank, rank + dp, ...`` padded (with item 0) to
    ``ceil(n / dp)`` so every rank runs the same number of batches (sharded lookups are collectives); returns
    ``(indices, valid)``, the first ``valid`` being real."""
    per_rank = -(-n // dp_size)
    own = np.arange(dp_rank, n, dp_size, dtype=np.int64)
    return np.concatenate([own, np.zeros(per_rank - len(own), dtype=np.int64)]), len(own)


def unstride(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of ``strided_shard`` on per-item results: rank r's j-th value goes to item ``j * dp + r``."""
    n = sum(len(p) for p in parts)
    out = parts[0].new_empty((n, *parts[0].shape[1:]))
    for r, p in enumerate(parts):
        out[r :: len(parts)] = p
    return out


def all_gather_uneven(tensor: torch.Tensor, group: Any) -> list[torch.Tensor]:
    """``all_gather`` of tensors whose first dimension differs per rank (gloo and nccl need equal shapes: the
    sizes go first, then every tensor padded to the largest)."""
    size = dist.get_world_size(group)
    n = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    sizes = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(sizes, n, group=group)
    counts = [int(s) for s in sizes]
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    out = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(out, padded, group=group)
    return [t[:c] for t, c in zip(out, counts, strict=True)]
