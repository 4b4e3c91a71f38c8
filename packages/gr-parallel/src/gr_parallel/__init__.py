"""gr-parallel: hybrid parallelism for generative recommenders.

TorchRec model-parallel sparse part + Megatron-Core tensor/data-parallel dense part. The glue is tracked by the
gr-parallel issue. Available so far: length-aware data-parallel batches (``load_balance``): a global batch of jagged
sequences split over DP ranks so that each rank's attention cost (sum of L^2) is balanced.
"""

from gr_parallel.context import ParallelConfig, ParallelContext, destroy, get_context, initialize
from gr_parallel.load_balance import (
    LengthBalancedBatchSampler,
    balanced_partition,
    contiguous_partition,
    hstu_linear_coef,
    max_cost_lower_bound,
    partition_costs,
    sequence_costs,
)

__version__ = "0.1.0"

__all__ = [
    "LengthBalancedBatchSampler",
    "ParallelConfig",
    "ParallelContext",
    "balanced_partition",
    "contiguous_partition",
    "destroy",
    "get_context",
    "hstu_linear_coef",
    "initialize",
    "max_cost_lower_bound",
    "partition_costs",
    "sequence_costs",
]
