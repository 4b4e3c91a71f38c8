"""The ranking forward with its dense part (encoder + task heads) in an inference dtype.

Embedding tables stay in the model's dtype (TorchRec/FBGEMM tables, possibly dynamic, are looked up as trained) and
their outputs are cast; the encoder and heads run in a cast copy, so the caller's model is left as it is.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from gr_models.data.ranking import RankingBatch
from gr_models.ranking.hstu_ranking import HSTURankingModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float32/bfloat16/float16`` or ``"fp32"/"bf16"/"fp16"``."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


class CastRankingModel(nn.Module):
    """``HSTURankingModel.forward`` with the encoder and heads in ``dtype`` (eval mode). With the model's own dtype
    it shares the model's modules and its outputs equal ``model(batch)`` exactly."""

    def __init__(self, model: HSTURankingModel, dtype: torch.dtype | str = torch.float32) -> None:
        super().__init__()
        if not isinstance(model, HSTURankingModel):
            raise TypeError(f"model must be an HSTURankingModel, got {type(model).__name__}")
        self.dtype = resolve_dtype(dtype)
        self.model = model.eval()
        if self.dtype == next(model.encoder.parameters()).dtype:
            self.encoder, self.heads = model.encoder, model.heads
        else:
            self.encoder = copy.deepcopy(model.encoder).to(self.dtype).eval()
            self.heads = copy.deepcopy(model.heads).to(self.dtype).eval()

    @torch.inference_mode()
    def forward(self, batch: RankingBatch) -> torch.Tensor:
        """Task outputs of every candidate ``[T, num_tasks]`` in ``dtype``."""
        tokens = self.model.input_tokens(batch)
        h = self.encoder(
            tokens.x.to(self.dtype),
            tokens.offsets,
            tokens.max_len,
            tokens.timestamps,
            tokens.query_timestamps,
            num_targets=tokens.num_targets,
            contextual_seq_len=self.model.contextual_seq_len,
            positions=tokens.positions,
        )
        return self.heads(h[tokens.candidate_rows])
