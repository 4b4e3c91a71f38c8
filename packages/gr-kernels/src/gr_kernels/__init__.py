"""gr-kernels: HSTU attention ops for generative recommenders.

``hstu_attention`` runs the ``torch.library`` custom ops ``gr_kernels::hstu_attention_fwd``/``_bwd`` (autograd and
fake impls included); implementations plug in through the backend registry (``register_backend``). With
``q_offsets`` it runs delta q (the queries are only the last tokens of each sequence, attending to the whole
sequence: incremental inference over a KV cache); the reference implements it, native backends opt in.
"""

from gr_kernels.backends import (
    HSTUAttentionBackend,
    available_backends,
    get_backend,
    register_backend,
    unregister_backend,
)
from gr_kernels.cutlass_backend import CutlassBackend, native_available
from gr_kernels.hstu_attention import check_attention_values, hstu_attention
from gr_kernels.masks import hstu_valid_mask
from gr_kernels.params import AttentionCall, HSTUParams
from gr_kernels.reference import ReferenceBackend, reference_backward, reference_forward
from gr_kernels.triton_backend import TritonBackend, triton_available

__version__ = "0.1.0"

# Registered even without the compiled module: "auto" then logs once why it is skipped.
register_backend("cutlass", CutlassBackend())
# Portable kernels for other GPUs (and sm90 without the native build); needs triton, imported on first use.
register_backend("triton", TritonBackend())

__all__ = [
    "AttentionCall",
    "CutlassBackend",
    "HSTUAttentionBackend",
    "HSTUParams",
    "ReferenceBackend",
    "TritonBackend",
    "available_backends",
    "check_attention_values",
    "get_backend",
    "hstu_attention",
    "hstu_valid_mask",
    "native_available",
    "reference_backward",
    "reference_forward",
    "register_backend",
    "triton_available",
    "unregister_backend",
]
