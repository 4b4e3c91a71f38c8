"""Neural building blocks of gr-models: input embeddings, HSTU and SASRec encoders, relative attention bias."""

from gr_models.modules.hstu import HSTUBlock, HSTUConfig, HSTUEncoder
from gr_models.modules.input_embedding import ItemInputEmbedding
from gr_models.modules.relative_bias import RelativeBucketedTimeAndPositionBias, log_time_buckets
from gr_models.modules.sasrec import SASRecConfig, SASRecEncoder

__all__ = [
    "HSTUBlock",
    "HSTUConfig",
    "HSTUEncoder",
    "ItemInputEmbedding",
    "RelativeBucketedTimeAndPositionBias",
    "SASRecConfig",
    "SASRecEncoder",
    "log_time_buckets",
]
