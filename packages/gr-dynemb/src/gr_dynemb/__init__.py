"""gr-dynemb: dynamic (hash-table) embedding tables for TorchRec.

``DynamicHashTable`` is the native collision-free int64 -> row table (host memory, multi-threaded C++) with scores,
eviction policies, growth and export; ``DynamicEmbedding`` is an embedding module over it with admission and fused
backward optimizers (SGD, Adagrad, row-wise Adagrad, Adam). The CUDA table, host tier, TorchRec sharder and
checkpoints are the next steps of the gr-dynemb issue.
"""

from gr_dynemb.collection import DynamicEmbeddingCollection, DynamicTable
from gr_dynemb.embedding import DynamicEmbedding, DynamicEmbeddingConfig, FusedOptimizerConfig
from gr_dynemb.table import (
    BUCKET_SIZE,
    EVICTED,
    FOUND,
    INSERTED,
    REJECTED,
    RESERVED_KEYS,
    DynamicHashTable,
    DynamicTableConfig,
    InitializerConfig,
    TableFullError,
    owner_ranks,
)

__version__ = "0.1.0"

__all__ = [
    "BUCKET_SIZE",
    "EVICTED",
    "FOUND",
    "INSERTED",
    "REJECTED",
    "RESERVED_KEYS",
    "DynamicEmbedding",
    "DynamicEmbeddingCollection",
    "DynamicEmbeddingConfig",
    "DynamicHashTable",
    "DynamicTable",
    "DynamicTableConfig",
    "FusedOptimizerConfig",
    "InitializerConfig",
    "TableFullError",
    "owner_ranks",
]
