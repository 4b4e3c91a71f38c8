"""Neural building blocks of gr-models: input embeddings, HSTU and SASRec encoders, relative attention bias."""

from gr_models.modules.compile import compile_hstu_blocks, uncompile_hstu_blocks
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
    "compile_hstu_blocks",
    "log_time_buckets",
    "uncompile_hstu_blocks",
]
