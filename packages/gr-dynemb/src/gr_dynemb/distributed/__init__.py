"""Dynamic tables inside TorchRec's ``DistributedModelParallel``.

A user writes a normal ``EmbeddingCollection`` of ``EmbeddingConfig`` tables, marks the dynamic ones with
``DynamicParameterConstraints(dynamic=DynamicTableOptions(...))``, plans with ``DynamicEmbeddingShardingPlanner`` and
shards with ``DynamicEmbeddingCollectionSharder``::

    constraints = {"items": DynamicParameterConstraints(dynamic=DynamicTableOptions(capacity=1 << 20))}
    planner = DynamicEmbeddingShardingPlanner(Topology(world_size=ws, compute_device="cuda"), constraints=constraints)
    sharders = [DynamicEmbeddingCollectionSharder(fused_params={"optimizer": EmbOptimType.ADAM, "learning_rate": 1e-3})]
    plan = planner.collective_plan(model, sharders, process_group)
    model = DistributedModelParallel(model, plan=plan, sharders=sharders, device=device)

Dynamic tables are sharded row-wise by key hash (``owner_ranks``) on TorchRec's ``CUSTOMIZED_KERNEL``; static
tables of the same collection or model go through TorchRec's kernels in the same plan. ``dump_sharded`` /
``load_sharded`` write and read per-rank table dumps and re-shard them on a different world size.
"""

from gr_dynemb.distributed.checkpoint import dump_sharded, load_sharded, shard_paths
from gr_dynemb.distributed.options import (
    DYNAMIC_KERNEL,
    DYNAMIC_SHARDING,
    DynamicParameterConstraints,
    DynamicParameterSharding,
    DynamicTableOptions,
)
from gr_dynemb.distributed.planner import DynamicEmbeddingShardingPlanner, with_dynamic_options
from gr_dynemb.distributed.sharded_collection import DynamicEmbeddingShard, ShardedDynamicEmbeddingCollection
from gr_dynemb.distributed.sharder import DynamicEmbeddingCollectionSharder

__all__ = [
    "DYNAMIC_KERNEL",
    "DYNAMIC_SHARDING",
    "DynamicEmbeddingCollectionSharder",
    "DynamicEmbeddingShard",
    "DynamicEmbeddingShardingPlanner",
    "DynamicParameterConstraints",
    "DynamicParameterSharding",
    "DynamicTableOptions",
    "ShardedDynamicEmbeddingCollection",
    "dump_sharded",
    "load_sharded",
    "shard_paths",
    "with_dynamic_options",
]
