"""``DynamicEmbeddingCollectionSharder``: TorchRec's ``EmbeddingCollectionSharder`` plus gr_dynemb tables on the
``CUSTOMIZED_KERNEL`` hook. Give it to ``DistributedModelParallel`` in place of TorchRec's EC sharder: collections
without dynamic tables are sharded by TorchRec exactly as before."""

from __future__ import annotations

from typing import Any

import torch
from torchrec import EmbeddingCollection
from torchrec.distributed.embedding import EmbeddingCollectionSharder, ShardedEmbeddingCollection
from torchrec.distributed.types import ParameterSharding, ShardingEnv

from gr_dynemb.distributed.options import DYNAMIC_KERNEL, DYNAMIC_SHARDING
from gr_dynemb.distributed.sharded_collection import ShardedDynamicEmbeddingCollection


class DynamicEmbeddingCollectionSharder(EmbeddingCollectionSharder):
    """Offers ``CUSTOMIZED_KERNEL`` (row-wise) next to TorchRec's kernels; ``fused_params`` configure the static
    tables' kernels and are also the default optimizer of dynamic tables without their own."""

    def __init__(self, fused_params: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(fused_params=fused_params, **kwargs)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        kernels = super().compute_kernels(sharding_type, compute_device_type)
        if sharding_type == DYNAMIC_SHARDING:
            kernels = [*kernels, DYNAMIC_KERNEL]
        return kernels

    def shard(
        self,
        module: EmbeddingCollection,
        params: dict[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device | None = None,
        module_fqn: str | None = None,
    ) -> ShardedEmbeddingCollection | ShardedDynamicEmbeddingCollection:
        if not any(ps.compute_kernel == DYNAMIC_KERNEL for ps in params.values()):
            return super().shard(module, params, env, device, module_fqn)
        static = EmbeddingCollectionSharder(
            fused_params=self.fused_params,
            qcomm_codecs_registry=self.qcomm_codecs_registry,
            use_index_dedup=self._use_index_dedup,
        )
        return ShardedDynamicEmbeddingCollection(module, params, env, static, device, module_fqn)
