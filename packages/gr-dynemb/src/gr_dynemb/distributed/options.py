"""How a user marks a table of a TorchRec ``EmbeddingCollection`` dynamic, and how that choice travels in a plan.

``DynamicTableOptions`` holds everything a dynamic table needs beyond its ``EmbeddingConfig`` (name, dim, features):
capacity, eviction policy, admission, initializer and, optionally, its own fused optimizer. It is given to the planner
through ``DynamicParameterConstraints`` (a ``ParameterConstraints`` that pins row-wise sharding and the
``CUSTOMIZED_KERNEL`` compute kernel) and reaches the sharder inside the plan as ``DynamicParameterSharding``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ParameterSharding, ShardingType

from gr_dynemb.embedding import DynamicEmbeddingConfig, FusedOptimizerConfig
from gr_dynemb.table import DynamicTableConfig, InitializerConfig, ScorePolicy

DYNAMIC_KERNEL = EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value
DYNAMIC_SHARDING = ShardingType.ROW_WISE.value  # row-wise by key hash: rank owner_ranks(key, world_size)


@dataclass
class DynamicTableOptions:
    """A dynamic table's settings (per rank: ``capacity`` and ``max_capacity`` are the rows of one shard).

    ``optimizer=None`` takes the optimizer the static tables use (the sharder's ``fused_params`` or the table's
    ``apply_optimizer_in_backward`` optimizer), so one model-wide optimizer setting trains both kinds of table.
    """

    capacity: int = 1 << 16
    max_capacity: int = 1 << 24
    policy: ScorePolicy = "lru"
    initializer: InitializerConfig = field(default_factory=InitializerConfig)
    max_load_factor: float = 0.75
    num_threads: int = 0
    admit_after: int = 0
    default_value: float = 0.0
    eval_missing: str = "default"  # see DynamicEmbeddingConfig.eval_missing
    optimizer: FusedOptimizerConfig | None = None
    # Where a shard's table lives: "cpu" (host memory) or, with a gr_dynemb built with its CUDA table, "cuda" (the
    # GPU DistributedModelParallel shards this rank onto; "cuda:<i>" pins one), optionally with only hbm_budget_bytes
    # of value rows in HBM and the rest in pinned host memory.
    device: str = "cpu"
    hbm_budget_bytes: int | None = None
    # Caching storage for each shard (gr_dynemb.caching): a host table of the shard's rows with a cache of this many
    # slots on ``device``.
    cache_capacity: int | None = None

    def embedding_config(self, dim: int, optimizer: FusedOptimizerConfig) -> DynamicEmbeddingConfig:
        table = DynamicTableConfig(
            dim=dim,
            capacity=self.capacity,
            max_capacity=self.max_capacity,
            policy=self.policy,
            initializer=self.initializer,
            max_load_factor=self.max_load_factor,
            num_threads=self.num_threads,
            device=self.device,
            hbm_budget_bytes=self.hbm_budget_bytes,
            cache_capacity=self.cache_capacity,
        )
        return DynamicEmbeddingConfig(
            table,
            optimizer,
            admit_after=self.admit_after,
            default_value=self.default_value,
            eval_missing=self.eval_missing,  # type: ignore[arg-type]
        )


@dataclass
class DynamicParameterConstraints(ParameterConstraints):
    """Marks a table dynamic for ``DynamicEmbeddingShardingPlanner``: row-wise by key hash, ``CUSTOMIZED_KERNEL``.

    Asking for any other sharding type or compute kernel is an error: a dynamic table has no row ranges to place
    and trains only through its own fused optimizer.
    """

    dynamic: DynamicTableOptions = field(default_factory=DynamicTableOptions)

    def __post_init__(self) -> None:
        if self.sharding_types is None:
            self.sharding_types = [DYNAMIC_SHARDING]
        if self.compute_kernels is None:
            self.compute_kernels = [DYNAMIC_KERNEL]
        if list(self.sharding_types) != [DYNAMIC_SHARDING]:
            raise ValueError(
                f"a dynamic table is sharded row-wise by key hash; sharding_types must be ['{DYNAMIC_SHARDING}'], "
                f"got {self.sharding_types}"
            )
        if list(self.compute_kernels) != [DYNAMIC_KERNEL]:
            raise ValueError(
                f"a dynamic table computes with gr_dynemb's kernel ('{DYNAMIC_KERNEL}') and its fused optimizer; "
                f"compute_kernels must be ['{DYNAMIC_KERNEL}'], got {self.compute_kernels}"
            )


@dataclass
class DynamicParameterSharding(ParameterSharding):
    """The plan entry of a dynamic table: TorchRec's ``ParameterSharding`` plus the table's options."""

    dynamic: DynamicTableOptions | None = None

    @classmethod
    def of(cls, sharding: ParameterSharding, options: DynamicTableOptions) -> DynamicParameterSharding:
        base = {f.name: getattr(sharding, f.name) for f in fields(ParameterSharding)}
        return cls(**base, dynamic=options)


# fbgemm's EmbOptimType values (fused_params["optimizer"]) and torch optimizer classes (apply_optimizer_in_backward)
# that a dynamic table can run inside its backward.
_FBGEMM_OPTIMIZERS = {
    "sgd": "sgd",
    "exact_sgd": "sgd",
    "adagrad": "adagrad",
    "exact_adagrad": "adagrad",
    "exact_row_wise_adagrad": "rowwise_adagrad",
    "row_wise_adagrad": "rowwise_adagrad",
    "adam": "adam",
}
_TORCH_OPTIMIZERS = {torch.optim.SGD: "sgd", torch.optim.Adagrad: "adagrad", torch.optim.Adam: "adam"}


def resolve_optimizer(
    table: str, options: DynamicTableOptions, fused_params: dict[str, Any] | None, weight: torch.Tensor | None
) -> FusedOptimizerConfig:
    """The fused optimizer of dynamic table ``table``: its own, else the table weight's in-backward optimizer, else
    the sharder's ``fused_params``. Anything that cannot run fused inside the table is an error."""
    if options.optimizer is not None:
        return options.optimizer
    classes = getattr(weight, "_optimizer_classes", None) if weight is not None else None
    if classes:
        cls, kwargs = classes[0], dict(getattr(weight, "_optimizer_kwargs", [{}])[0])
        if cls not in _TORCH_OPTIMIZERS:
            raise ValueError(
                f"dynamic table {table!r}: optimizer {cls.__name__} cannot run fused inside the table; use one of "
                f"{[c.__name__ for c in _TORCH_OPTIMIZERS]} or set DynamicTableOptions.optimizer"
            )
        if kwargs.get("weight_decay", 0.0):
            raise ValueError(f"dynamic table {table!r}: weight_decay is not supported by the fused table optimizers")
        beta1, beta2 = kwargs.get("betas", (0.9, 0.999))
        return FusedOptimizerConfig(
            _TORCH_OPTIMIZERS[cls],
            lr=kwargs.get("lr", 1e-3),
            eps=kwargs.get("eps", 1e-10 if cls is torch.optim.Adagrad else 1e-8),
            beta1=beta1,
            beta2=beta2,
        )
    if fused_params and "optimizer" in fused_params:
        opt = fused_params["optimizer"]
        name = str(getattr(opt, "value", opt)).lower()
        if name not in _FBGEMM_OPTIMIZERS:
            raise ValueError(
                f"dynamic table {table!r}: fused optimizer {opt} has no gr_dynemb equivalent; supported: "
                f"{sorted(_FBGEMM_OPTIMIZERS)} (or set DynamicTableOptions.optimizer)"
            )
        if fused_params.get("weight_decay", 0.0):
            raise ValueError(f"dynamic table {table!r}: weight_decay is not supported by the fused table optimizers")
        return FusedOptimizerConfig(
            _FBGEMM_OPTIMIZERS[name],
            lr=float(fused_params.get("learning_rate", 1e-3)),
            eps=float(fused_params.get("eps", 1e-8)),
            beta1=float(fused_params.get("beta1", 0.9)),
            beta2=float(fused_params.get("beta2", 0.999)),
        )
    raise ValueError(
        f"dynamic table {table!r} has no fused optimizer: set DynamicTableOptions.optimizer, the sharder's "
        "fused_params={'optimizer': EmbOptimType..., 'learning_rate': ...}, or apply_optimizer_in_backward on the table"
    )
