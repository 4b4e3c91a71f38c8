"""Data pipeline: interaction logs (MovieLens, synthetic) -> per-user sequences -> jagged next-item batches."""

from gr_models.data.batching import (
    ITEM_FEATURE,
    EpochBatchSampler,
    NextItemEvalDataset,
    NextItemTrainDataset,
    SequenceBatch,
    collate_sequences,
    make_dataloader,
)
from gr_models.data.interactions import InteractionLog
from gr_models.data.movielens import MOVIELENS_DATASETS, DataFormatError, load_movielens
from gr_models.data.sequences import LeaveOneOutSplit, UserSequences, build_user_sequences, leave_one_out_split
from gr_models.data.synthetic import SyntheticConfig, generate_synthetic

__all__ = [
    "ITEM_FEATURE",
    "MOVIELENS_DATASETS",
    "DataFormatError",
    "EpochBatchSampler",
    "InteractionLog",
    "LeaveOneOutSplit",
    "NextItemEvalDataset",
    "NextItemTrainDataset",
    "SequenceBatch",
    "SyntheticConfig",
    "UserSequences",
    "build_user_sequences",
    "collate_sequences",
    "generate_synthetic",
    "leave_one_out_split",
    "load_movielens",
    "make_dataloader",
]
