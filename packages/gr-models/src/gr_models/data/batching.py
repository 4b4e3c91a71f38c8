"""Next-item datasets and jagged batches: sequences are concatenated, never padded, in the data path."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchrec import KeyedJaggedTensor

from gr_models.data.sequences import LeaveOneOutSplit, UserSequences

log = logging.getLogger("gr_models.data")

ITEM_FEATURE = "item"


@dataclass
class SequenceBatch:
    """A batch of B jagged sequences.

    Training batches carry a target for every input position (``target_items[total]``: the next item);
    evaluation batches carry one held-out target per sequence (``target_items[B]``) and the user's full history
    (``history_offsets``/``history_items``) so that it can be removed from the ranking.
    """

    user_ids: torch.Tensor
    features: KeyedJaggedTensor
    timestamps: torch.Tensor
    seq_offsets: torch.Tensor
    max_seq_len: int
    target_items: torch.Tensor
    target_timestamps: torch.Tensor
    history_offsets: torch.Tensor | None = None
    history_items: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.user_ids.numel())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SequenceBatch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=non_blocking) if hasattr(value, "to") else value
        return SequenceBatch(**moved)

    def pin_memory(self) -> SequenceBatch:
        pinned = {}
        for f in fields(self):
            value = getattr(self, f.name)
            pinned[f.name] = value.pin_memory() if hasattr(value, "pin_memory") else value
        return SequenceBatch(**pinned)


class SequenceExample(NamedTuple):
    user: int
    items: np.ndarray
    timestamps: np.ndarray
    target_items: np.ndarray  # [L] for training, [1] for evaluation
    target_timestamps: np.ndarray
    history: np.ndarray | None  # evaluation only: every item the user had before the target


class NextItemTrainDataset(Dataset[SequenceExample]):
    """One example per user: the most recent ``max_seq_len + 1`` training items; inputs predict the next item."""

    def __init__(self, train: UserSequences, max_seq_len: int) -> None:
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.seqs = train
        self.max_seq_len = max_seq_len
        self.positions = np.flatnonzero(train.lengths >= 2)
        skipped = len(train) - len(self.positions)
        if skipped:
            log.info("%d users have fewer than 2 training items and yield no training example", skipped)
        self.num_skipped_users = skipped

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, idx: int) -> SequenceExample:
        p = int(self.positions[idx])
        keep = self.max_seq_len + 1
        items = self.seqs.items_of(p)[-keep:]
        ts = self.seqs.timestamps_of(p)[-keep:]
        return SequenceExample(int(self.seqs.users[p]), items[:-1], ts[:-1], items[1:], ts[1:], None)


class NextItemEvalDataset(Dataset[SequenceExample]):
    """Validation: history = training items, target = second-to-last item. Test: history = all but the last
    item, target = the last. The model sees the most recent ``max_seq_len`` history items."""

    def __init__(self, split: LeaveOneOutSplit, stage: Literal["valid", "test"], max_seq_len: int) -> None:
        if stage not in ("valid", "test"):
            raise ValueError(f"stage must be 'valid' or 'test', got {stage!r}")
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.split = split
        self.stage = stage
        self.max_seq_len = max_seq_len
        self.history_drop = 2 if stage == "valid" else 1

    def __len__(self) -> int:
        return len(self.split.full)

    def __getitem__(self, idx: int) -> SequenceExample:
        full = self.split.full
        history = full.items_of(idx)[: -self.history_drop]
        ts = full.timestamps_of(idx)[: -self.history_drop]
        if self.stage == "valid":
            target, target_ts = self.split.valid_targets[idx], self.split.valid_target_timestamps[idx]
        else:
            target, target_ts = self.split.test_targets[idx], self.split.test_target_timestamps[idx]
        return SequenceExample(
            int(full.users[idx]),
            history[-self.max_seq_len :],
            ts[-self.max_seq_len :],
            np.array([target], dtype=np.int64),
            np.array([target_ts], dtype=np.int64),
            history,
        )


def _cat(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate(arrays).astype(np.int64, copy=False))


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])


def collate_sequences(examples: Sequence[SequenceExample]) -> SequenceBatch:
    """Concatenates examples into a jagged SequenceBatch (item ids as a TorchRec KeyedJaggedTensor)."""
    if len(examples) == 0:
        raise ValueError("empty batch: collate_sequences got no examples")
    lengths = torch.tensor([len(e.items) for e in examples], dtype=torch.int64)
    values = _cat([e.items for e in examples])
    is_eval = examples[0].history is not None
    if any((e.history is not None) != is_eval for e in examples):
        raise ValueError("cannot mix training and evaluation examples in one batch")
    history_offsets = history_items = None
    if is_eval:
        history_offsets = _offsets(torch.tensor([len(e.history) for e in examples], dtype=torch.int64))
        history_items = _cat([e.history for e in examples])
    return SequenceBatch(
        user_ids=torch.tensor([e.user for e in examples], dtype=torch.int64),
        features=KeyedJaggedTensor(keys=[ITEM_FEATURE], values=values, lengths=lengths),
        timestamps=_cat([e.timestamps for e in examples]),
        seq_offsets=_offsets(lengths),
        max_seq_len=int(lengths.max()),
        target_items=_cat([e.target_items for e in examples]),
        target_timestamps=_cat([e.target_timestamps for e in examples]),
        history_offsets=history_offsets,
        history_items=history_items,
    )


class EpochBatchSampler:
    """Deterministic, resumable batches of indices.

    The order of epoch ``e`` is a permutation drawn from ``np.random.default_rng([seed, e])``: independent of every
    global RNG, so a resumed run sees the same batches. ``start_batch`` skips the first batches of the epoch
    (a run resumed mid-epoch).
    """

    def __init__(
        self, num_examples: int, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool = False
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_examples < 1:
            raise ValueError("EpochBatchSampler needs at least one example")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start_batch = 0

    def order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_examples)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_examples // self.batch_size
        return -(-self.num_examples // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        for b in range(self.start_batch, len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()


def make_dataloader(dataset: Dataset[SequenceExample], sampler: EpochBatchSampler, num_workers: int = 0) -> DataLoader:
    # A private generator: DataLoader draws a worker base seed from its generator every time an iterator is
    # created; from the global one that draw would shift every later random number of a run resumed mid-epoch.
    generator = torch.Generator().manual_seed(sampler.seed)
    return DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_sequences, num_workers=num_workers, generator=generator
    )
