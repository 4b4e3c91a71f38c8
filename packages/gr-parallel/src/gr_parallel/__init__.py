"""gr-parallel: hybrid parallelism for generative recommenders.

TorchRec model-parallel sparse part + Megatron-Core tensor/data-parallel dense part. The glue is tracked by the
gr-parallel issue. Available so far: length-aware data-parallel batches (``load_balance``): a global batch of jagged
sequences split over DP ranks so that each rank's attention cost (sum of L^2) is balanced; ``parallelize`` (TP
conversion, every embedding table sharded over the world by TorchRec + gr-dynemb, dense gradient sync over DP,
clipping across TP and DP, bf16) with its parts ``shard_sparse`` and ``dense``.
"""

from gr_parallel.checkpoint import CheckpointMismatchError, LoadedCheckpoint, load_distributed, save_distributed
from gr_parallel.context import ParallelConfig, ParallelContext, destroy, get_context, initialize
from gr_parallel.dense import (
    DenseGradSync,
    DenseOptimizerConfig,
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
from gr_parallel.parallelize import EmbeddingOptimizerConfig, ParallelizeConfig, ParallelModel, parallelize
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

__all__ = [
    "CheckpointMismatchError",
    "DenseGradSync",
    "DenseOptimizerConfig",
    "EmbeddingOptimizerConfig",
    "LengthBalancedBatchSampler",
    "LoadedCheckpoint",
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
