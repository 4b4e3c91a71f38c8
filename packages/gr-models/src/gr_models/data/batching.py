"""Next-item datasets and jagged batches: sequences are concatenated, never padded, anywhere in the data path."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchrec import KeyedJaggedTensor

from gr_models.data.sequences import LeaveOneOutSplit, UserSequences

logger = logging.getLogger("gr_models.data")

ITEM_FEATURE = "item"


@dataclass
class SequenceBatch:
    """B jagged sequences; sequence ``b`` is ``features.values()[seq_offsets[b]:seq_offsets[b + 1]]``.

    Training batches hold a target for every input position (``target_items[total]``: the item that followed it).
    Evaluation batches hold one held-out target per sequence (``target_items[B]``) and the user's whole history
    before the target (``history_offsets`` / ``history_items``), which the ranking must exclude.
    """

    user_ids: torch.Tensor  # int64 [B]
    features: KeyedJaggedTensor  # key ITEM_FEATURE: input item ids, jagged
    timestamps: torch.Tensor  # int64 [total], aligned with features.values()
    seq_offsets: torch.Tensor  # int64 [B + 1], == features.offsets()
    max_seq_len: int  # longest input sequence of this batch
    target_items: torch.Tensor  # train: int64 [total]; eval: int64 [B]
    target_timestamps: torch.Tensor  # same shape as target_items
    history_offsets: torch.Tensor | None = None  # eval only: int64 [B + 1]
    history_items: torch.Tensor | None = None  # eval only: int64 [history total]
    # True when the offsets were built or checked on the host (non-decreasing from 0 to the token count, lengths <=
    # max_seq_len), as ``collate_sequences`` builds them: the model then skips the attention op's value check of the
    # offsets, which on a GPU is a device-to-host copy and a sync every forward.
    offsets_checked: bool = False

    def __len__(self) -> int:
        return int(self.user_ids.numel())

    @property
    def is_eval(self) -> bool:
        return self.history_offsets is not None

    def _map(self, fn: Callable[[Any], Any]) -> SequenceBatch:
        def optional(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else fn(x)

        return SequenceBatch(
            user_ids=fn(self.user_ids),
            features=fn(self.features),
            timestamps=fn(self.timestamps),
            seq_offsets=fn(self.seq_offsets),
            max_seq_len=self.max_seq_len,
            target_items=fn(self.target_items),
            target_timestamps=fn(self.target_timestamps),
            history_offsets=optional(self.history_offsets),
            history_items=optional(self.history_items),
            offsets_checked=self.offsets_checked,
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SequenceBatch:
        return self._map(lambda x: x.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> SequenceBatch:
        """Called by DataLoader(pin_memory=True) so host-to-device copies can be asynchronous."""
        return self._map(lambda x: x.pin_memory())


class SequenceExample(NamedTuple):
    """One dataset item; ``history`` is None for training examples."""

    user: int
    items: np.ndarray  # int64 [L] input items, oldest first
    timestamps: np.ndarray  # int64 [L]
    target_items: np.ndarray  # training: int64 [L] (next item per position); evaluation: int64 [1]
    target_timestamps: np.ndarray
    history: np.ndarray | None  # evaluation: every item of the user before the target


class NextItemTrainDataset(Dataset[SequenceExample]):
    """One example per user over the training sequences (``split.train``).

    The example keeps the user's most recent ``max_seq_len + 1`` training items ``s``: inputs ``s[:-1]``, targets
    ``s[1:]``. A user with fewer than 2 training items has no (input, next item) pair and yields no example; such
    users are counted in ``num_skipped_users`` and logged once here.
    """

    def __init__(self, train: UserSequences, max_seq_len: int) -> None:
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.sequences = train
        self.max_seq_len = max_seq_len
        self.positions = np.flatnonzero(train.lengths >= 2)  # sequence index of each example
        self.num_skipped_users = len(train) - len(self.positions)
        if self.num_skipped_users:
            logger.info(
                "NextItemTrainDataset: %d of %d users have fewer than 2 training items and yield no example",
                self.num_skipped_users,
                len(train),
            )

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, idx: int) -> SequenceExample:
        p = int(self.positions[idx])
        items = self.sequences.items_of(p)[-(self.max_seq_len + 1) :]
        stamps = self.sequences.timestamps_of(p)[-(self.max_seq_len + 1) :]
        return SequenceExample(int(self.sequences.users[p]), items[:-1], stamps[:-1], items[1:], stamps[1:], None)


class NextItemEvalDataset(Dataset[SequenceExample]):
    """One example per user of ``split.full``.

    ``"valid"``: history = the training sequence (all but the last 2 items), target = the second-to-last item.
    ``"test"``: history = all but the last item, target = the last item. The model input is the most recent
    ``max_seq_len`` history items; ``history`` carries the whole history, to be removed from the ranking.
    """

    def __init__(self, split: LeaveOneOutSplit, stage: Literal["valid", "test"], max_seq_len: int) -> None:
        if stage not in ("valid", "test"):
            raise ValueError(f"stage must be 'valid' or 'test', got {stage!r}")
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.split = split
        self.stage = stage
        self.max_seq_len = max_seq_len
        self._held_out = 2 if stage == "valid" else 1  # events after the end of the history
        if stage == "valid":
            self._targets, self._target_ts = split.valid_targets, split.valid_target_timestamps
        else:
            self._targets, self._target_ts = split.test_targets, split.test_target_timestamps

    def __len__(self) -> int:
        return len(self.split.full)

    def __getitem__(self, idx: int) -> SequenceExample:
        full = self.split.full
        history = full.items_of(idx)[: -self._held_out]
        stamps = full.timestamps_of(idx)[: -self._held_out]
        return SequenceExample(
            int(full.users[idx]),
            history[-self.max_seq_len :],
            stamps[-self.max_seq_len :],
            self._targets[idx : idx + 1],
            self._target_ts[idx : idx + 1],
            history,
        )


def _concat(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate(arrays).astype(np.int64, copy=False))


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return offsets


def collate_sequences(examples: Sequence[SequenceExample]) -> SequenceBatch:
    """Concatenates examples into one jagged SequenceBatch (no padding); item ids travel as a KeyedJaggedTensor."""
    if len(examples) == 0:
        raise ValueError("empty batch: collate_sequences got no examples")
    is_eval = examples[0].history is not None
    if any((e.history is not None) != is_eval for e in examples):
        raise ValueError("cannot mix training and evaluation examples in one batch")
    lengths = torch.tensor([len(e.items) for e in examples], dtype=torch.int64)
    offsets = _offsets(lengths)
    history_offsets = history_items = None
    if is_eval:
        histories = [e.history for e in examples if e.history is not None]
        history_offsets = _offsets(torch.tensor([len(h) for h in histories], dtype=torch.int64))
        history_items = _concat(histories)
    return SequenceBatch(
        user_ids=torch.tensor([e.user for e in examples], dtype=torch.int64),
        features=KeyedJaggedTensor(
            keys=[ITEM_FEATURE], values=_concat([e.items for e in examples]), lengths=lengths, offsets=offsets
        ),
        timestamps=_concat([e.timestamps for e in examples]),
        seq_offsets=offsets,
        max_seq_len=int(lengths.max()),
        target_items=_concat([e.target_items for e in examples]),
        target_timestamps=_concat([e.target_timestamps for e in examples]),
        history_offsets=history_offsets,
        history_items=history_items,
        offsets_checked=True,  # cumulative sums of the lengths, whose maximum is max_seq_len
    )


class EpochBatchSampler:
    """Deterministic, resumable batches of example indices (a ``batch_sampler`` for DataLoader).

    The order of epoch ``e`` is ``np.random.default_rng([seed, e]).permutation(num_examples)`` (or ``0..n-1``
    without shuffling): a pure function of (seed, epoch), independent of every global RNG. ``start_batch`` skips
    the first batches of the epoch, for a run resumed mid-epoch; ``set_epoch`` resets it to its argument (0 by
    default). ``len()`` is the number of batches of a whole epoch, skipped ones included.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        drop_last: bool = False,
        start_batch: int = 0,
    ) -> None:
        if num_examples < 1:
            raise ValueError(f"EpochBatchSampler needs at least one example, got num_examples={num_examples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = start_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def order(self) -> np.ndarray:
        """Example indices of the current epoch, in the order they are served."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_examples)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_examples // self.batch_size
        return -(-self.num_examples // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {self.start_batch}")
        order = self.order()
        for b in range(self.start_batch, len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()


def make_dataloader(
    dataset: Dataset[SequenceExample],
    sampler: EpochBatchSampler,
    num_workers: int = 0,
    *,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader serving ``sampler``'s batches of ``dataset`` as SequenceBatch."""
    # DataLoader draws a base seed for workers from its generator each time an iterator starts; a private
    # generator keeps that draw from advancing the global torch RNG (which would break exact resume).
    generator = torch.Generator().manual_seed(sampler.seed)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_sequences,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=generator,
    )
