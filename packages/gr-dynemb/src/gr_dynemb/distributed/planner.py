"""``DynamicEmbeddingShardingPlanner``: TorchRec's planner, aware of dynamic tables.

Tables marked with ``DynamicParameterConstraints`` are planned on ``CUSTOMIZED_KERNEL`` / row-wise and their plan
entries carry their ``DynamicTableOptions`` (``DynamicParameterSharding``); every other table is planned by TorchRec
as usual and never lands on ``CUSTOMIZED_KERNEL``. TorchRec's estimators do not know the customised kernel, so a
dynamic table's options are costed as the fused row-wise kernel (a hash table row costs about what a TBE row does).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.types import ParameterConstraints, ShardingOption
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ModuleSharder, ShardingPlan

from gr_dynemb.distributed.options import DYNAMIC_KERNEL, DynamicParameterConstraints, DynamicParameterSharding

_COSTED_AS = EmbeddingComputeKernel.FUSED.value


class _DynamicAwareEnumerator(EmbeddingEnumerator):
    def __init__(self, *args: Any, dynamic: set[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._dynamic = dynamic

    def enumerate(self, module: nn.Module, sharders: list[ModuleSharder[nn.Module]]) -> list[ShardingOption]:
        options = super().enumerate(module, sharders)
        # Only marked tables may use the customised kernel (the sharder offers it for every row-wise table).
        return [o for o in options if (o.compute_kernel == DYNAMIC_KERNEL) == (o.name in self._dynamic)]

    def populate_estimates(self, sharding_options: list[ShardingOption]) -> None:
        dynamic = [o for o in sharding_options if o.compute_kernel == DYNAMIC_KERNEL]
        for o in dynamic:
            o.compute_kernel = _COSTED_AS
        try:
            super().populate_estimates(sharding_options)
        finally:
            for o in dynamic:
                o.compute_kernel = DYNAMIC_KERNEL


class DynamicEmbeddingShardingPlanner(EmbeddingShardingPlanner):
    """``EmbeddingShardingPlanner`` taking ``DynamicParameterConstraints`` for dynamic tables (other arguments as
    TorchRec's; a custom ``enumerator`` is not accepted, this planner brings its own)."""

    def __init__(
        self,
        topology: Topology | None = None,
        batch_size: int | None = None,
        constraints: dict[str, ParameterConstraints] | None = None,
        **kwargs: Any,
    ) -> None:
        if "enumerator" in kwargs:
            raise ValueError("DynamicEmbeddingShardingPlanner builds its own enumerator; do not pass one")
        self._dynamic_options = {
            name: c.dynamic for name, c in (constraints or {}).items() if isinstance(c, DynamicParameterConstraints)
        }
        super().__init__(topology=topology, batch_size=batch_size, constraints=constraints, **kwargs)
        self._enumerator = _DynamicAwareEnumerator(
            topology=self._topology,
            batch_size=self._batch_size,
            constraints=constraints,
            dynamic=set(self._dynamic_options),
        )

    def plan(self, module: nn.Module, sharders: list[ModuleSharder[nn.Module]]) -> ShardingPlan:
        from gr_dynemb.distributed.sharder import DynamicEmbeddingCollectionSharder

        if self._dynamic_options and not any(isinstance(s, DynamicEmbeddingCollectionSharder) for s in sharders):
            raise ValueError(
                f"tables {sorted(self._dynamic_options)} are marked dynamic but no DynamicEmbeddingCollectionSharder "
                "is among the sharders; pass it in place of TorchRec's EmbeddingCollectionSharder"
            )
        plan = super().plan(module, sharders)
        return with_dynamic_options(plan, self._dynamic_options)


def with_dynamic_options(plan: ShardingPlan, options: dict) -> ShardingPlan:
    """Replaces the ``CUSTOMIZED_KERNEL`` entries of ``plan`` by ``DynamicParameterSharding`` with the options of
    their table (for plans written by hand or by another planner)."""
    for module_path, module_plan in plan.plan.items():
        if not isinstance(module_plan, EmbeddingModuleShardingPlan):
            continue
        for name, ps in list(module_plan.items()):
            if ps.compute_kernel != DYNAMIC_KERNEL or isinstance(ps, DynamicParameterSharding):
                continue
            if name not in options:
                raise ValueError(
                    f"{module_path}.{name} is planned on '{DYNAMIC_KERNEL}' but has no DynamicTableOptions"
                )
            module_plan[name] = DynamicParameterSharding.of(ps, options[name])
    return plan
