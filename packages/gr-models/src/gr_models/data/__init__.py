"""Data pipeline: interaction logs (MovieLens, synthetic) -> per-user sequences -> jagged next-item batches."""

from gr_models.data.batching import (
    ITEM_FEATURE,
    EpochBatchSampler,
    NextItemEvalDataset,
    NextItemTrainDataset,
    SequenceBatch,
    SequenceExample,
    collate_sequences,
    make_dataloader,
)
from gr_models.data.interactions import InteractionLog
from gr_models.data.movielens import (
    MOVIELENS_DATASETS,
    ChecksumError,
    DataFormatError,
    DatasetDownloadError,
    MovieLensSpec,
    default_cache_dir,
    download_movielens,
    load_movielens,
)
from gr_models.data.sequences import LeaveOneOutSplit, UserSequences, build_user_sequences, leave_one_out_split
from gr_models.data.synthetic import SyntheticConfig, generate_synthetic, synthetic_item_topics

__all__ = [
    "ITEM_FEATURE",
    "MOVIELENS_DATASETS",
    "ChecksumError",
    "DataFormatError",
    "DatasetDownloadError",
    "EpochBatchSampler",
    "InteractionLog",
    "LeaveOneOutSplit",
    "MovieLensSpec",
    "NextItemEvalDataset",
    "NextItemTrainDataset",
    "SequenceBatch",
    "SequenceExample",
    "SyntheticConfig",
    "UserSequences",
    "build_user_sequences",
    "collate_sequences",
    "default_cache_dir",
    "download_movielens",
    "generate_synthetic",
    "leave_one_out_split",
    "load_movielens",
    "make_dataloader",
    "synthetic_item_topics",
]
