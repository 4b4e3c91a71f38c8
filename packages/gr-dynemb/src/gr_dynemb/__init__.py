"""gr-dynemb: dynamic (hash-table) embedding tables for TorchRec.

``DynamicHashTable`` is the native collision-free int64 -> row table (host memory with multi-threaded C++, or a GPU
with an optional pinned-host-memory tier for value rows) with scores, eviction policies, growth and export;
``CachingHashTable`` (``make_table`` of a config with ``cache_capacity``) keeps every row in host memory and the
hot ones in a cache on the GPU; ``DynamicEmbedding`` is an embedding module over either with admission and fused
backward optimizers (SGD, Adagrad, row-wise Adagrad, Adam). ``DynamicEmbeddingCollection`` is TorchRec's
``EmbeddingCollection`` interface over such tables; ``gr_dynemb.distributed`` puts dynamic tables into TorchRec's
``DistributedModelParallel`` (sharded by key hash on the ``CUSTOMIZED_KERNEL`` hook, next to TorchRec's static
tables).
"""

from gr_dynemb.caching import CachingHashTable, make_table
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
    cuda_available,
    owner_ranks,
)

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The collection needs TorchRec; the tables and DynamicEmbedding do not, so it is imported on first use.
    if name in ("DynamicEmbeddingCollection", "DynamicTable"):
        from gr_dynemb import collection

        return getattr(collection, name)
    raise AttributeError(f"module 'gr_dynemb' has no attribute {name!r}")


__all__ = [
    "BUCKET_SIZE",
    "EVICTED",
    "FOUND",
    "INSERTED",
    "REJECTED",
    "RESERVED_KEYS",
    "CachingHashTable",
    "DynamicEmbedding",
    "DynamicEmbeddingCollection",
    "DynamicEmbeddingConfig",
    "DynamicHashTable",
    "DynamicTable",
    "DynamicTableConfig",
    "FusedOptimizerConfig",
    "InitializerConfig",
    "TableFullError",
    "cuda_available",
    "make_table",
    "owner_ranks",
]
