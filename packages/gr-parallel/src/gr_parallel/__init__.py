"""gr-parallel: hybrid parallelism for generative recommenders.

TorchRec model-parallel sparse part + Megatron-Core tensor/data-parallel dense part. The glue is tracked by the
gr-parallel issue. Available so far: length-aware data-parallel batches (``load_balance``): a global batch of jagged
sequences split over DP ranks so that each rank's attention cost (sum of L^2) is balanced; ``parallelize`` (TP
conversion, every embedding table sharded over the world by TorchRec + gr-dynemb, dense gradient sync over DP,
clipping across TP and DP, bf16) with its parts ``shard_sparse`` and ``dense``.

The exports load on first use (PEP 562): ``import gr_parallel`` stays light (no TorchRec, gr-models or
Megatron-Core until a name needing them is touched), which every spawned rank would otherwise pay for at start-up.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # type checkers and IDEs see every export as a plain import
    from gr_parallel.checkpoint import (
        CheckpointMismatchError,
        LoadedCheckpoint,
        load_distributed,
        save_distributed,
    )
    from gr_parallel.context import (
        ParallelConfig,
        ParallelContext,
        destroy,
        get_context,
        initialize,
    )
    from gr_parallel.dense import (
        DenseGradSync,
        DenseOptimizerConfig,
        MegatronGradSync,
        clip_grad_norm_,
        dense_parameters,
        global_count,
        sync_dense_grads,
    )
    from gr_parallel.launch import RankFailedError, run_ranks
    from gr_parallel.load_balance import (
        LengthBalancedBatchSampler,
        balanced_partition,
        contiguous_partition,
        hstu_linear_coef,
        max_cost_lower_bound,
        partition_costs,
        sequence_costs,
    )
    from gr_parallel.parallelize import (
        EmbeddingOptimizerConfig,
        ParallelizeConfig,
        ParallelModel,
        parallelize,
    )
    from gr_parallel.pipeline import TrainPipeline
    from gr_parallel.sparse import fused_params_for, shard_sparse
    from gr_parallel.tensor_parallel import (
        TensorParallelHSTUBlock,
        full_dense_grads,
        full_dense_state_dict,
        load_full_dense_state_dict,
        tensor_parallel_hstu,
    )

__version__ = "0.1.0"

# Export name -> the module defining it; ``__getattr__`` imports that module when the name is first read.
_EXPORTS: dict[str, str] = {
    "CheckpointMismatchError": "gr_parallel.checkpoint",
    "LoadedCheckpoint": "gr_parallel.checkpoint",
    "load_distributed": "gr_parallel.checkpoint",
    "save_distributed": "gr_parallel.checkpoint",
    "ParallelConfig": "gr_parallel.context",
    "ParallelContext": "gr_parallel.context",
    "destroy": "gr_parallel.context",
    "get_context": "gr_parallel.context",
    "initialize": "gr_parallel.context",
    "DenseGradSync": "gr_parallel.dense",
    "DenseOptimizerConfig": "gr_parallel.dense",
    "MegatronGradSync": "gr_parallel.dense",
    "clip_grad_norm_": "gr_parallel.dense",
    "dense_parameters": "gr_parallel.dense",
    "global_count": "gr_parallel.dense",
    "sync_dense_grads": "gr_parallel.dense",
    "RankFailedError": "gr_parallel.launch",
    "run_ranks": "gr_parallel.launch",
    "LengthBalancedBatchSampler": "gr_parallel.load_balance",
    "balanced_partition": "gr_parallel.load_balance",
    "contiguous_partition": "gr_parallel.load_balance",
    "hstu_linear_coef": "gr_parallel.load_balance",
    "max_cost_lower_bound": "gr_parallel.load_balance",
    "partition_costs": "gr_parallel.load_balance",
    "sequence_costs": "gr_parallel.load_balance",
    "EmbeddingOptimizerConfig": "gr_parallel.parallelize",
    "ParallelizeConfig": "gr_parallel.parallelize",
    "ParallelModel": "gr_parallel.parallelize",
    "parallelize": "gr_parallel.parallelize",
    "TrainPipeline": "gr_parallel.pipeline",
    "fused_params_for": "gr_parallel.sparse",
    "shard_sparse": "gr_parallel.sparse",
    "TensorParallelHSTUBlock": "gr_parallel.tensor_parallel",
    "full_dense_grads": "gr_parallel.tensor_parallel",
    "full_dense_state_dict": "gr_parallel.tensor_parallel",
    "load_full_dense_state_dict": "gr_parallel.tensor_parallel",
    "tensor_parallel_hstu": "gr_parallel.tensor_parallel",
}

__all__ = [
    "CheckpointMismatchError",
    "DenseGradSync",
    "DenseOptimizerConfig",
    "EmbeddingOptimizerConfig",
    "LengthBalancedBatchSampler",
    "LoadedCheckpoint",
    "MegatronGradSync",
    "ParallelConfig",
    "ParallelContext",
    "ParallelModel",
    "ParallelizeConfig",
    "RankFailedError",
    "TensorParallelHSTUBlock",
    "TrainPipeline",
    "balanced_partition",
    "clip_grad_norm_",
    "contiguous_partition",
    "dense_parameters",
    "destroy",
    "full_dense_grads",
    "full_dense_state_dict",
    "fused_params_for",
    "get_context",
    "global_count",
    "hstu_linear_coef",
    "initialize",
    "load_distributed",
    "load_full_dense_state_dict",
    "max_cost_lower_bound",
    "parallelize",
    "partition_costs",
    "run_ranks",
    "save_distributed",
    "sequence_costs",
    "shard_sparse",
    "sync_dense_grads",
    "tensor_parallel_hstu",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        # A submodule read as an attribute (``gr_parallel.sparse``), which the eager imports had loaded.
        if name.isidentifier() and not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}"):
            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later reads skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The import system binds a submodule on its package once it has loaded it. Where an export shares its module's
    name (``parallelize``), the package keeps the export, as the eager imports it replaces did, whoever imports the
    submodule first."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
