"""gr-parallel: hybrid parallelism for generative recommenders.

TorchRec model-parallel sparse part + Megatron-Core tensor/data-parallel dense part. The glue is tracked by the
gr-parallel issue; this package currently provides only its distribution metadata so that the monorepo layout,
dependency graph and install tests are in place.
"""

__version__ = "0.1.0"
