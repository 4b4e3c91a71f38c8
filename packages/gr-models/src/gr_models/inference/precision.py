"""Accuracy of the reduced-precision inference paths: ranking metrics per dtype on a dataset, deltas vs fp32."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gr_models.data.batching import EpochBatchSampler
from gr_models.data.ranking import RankingDataset, make_ranking_dataloader
from gr_models.inference.cast_model import CastRankingModel, resolve_dtype
from gr_models.ranking.hstu_ranking import HSTURankingModel
from gr_models.ranking.metrics import RankingMetrics


def evaluate_dtypes(
    model: HSTURankingModel,
    dataset: RankingDataset,
    dtypes: Sequence[str] = ("fp32", "bf16", "fp16"),
    *,
    batch_size: int = 128,
) -> dict[str, Any]:
    """Metrics of ``CastRankingModel(model, dtype)`` on every window of ``dataset``, per dtype, with the deltas of
    each metric against the first dtype (the reference, normally fp32) and the largest absolute difference of any
    output. Returns ``{"metrics": {dtype: {...}}, "delta": {dtype: {...}}, "max_abs_output_diff": {dtype: x}}``."""
    if not dtypes:
        raise ValueError("need at least one dtype")
    tasks = [t.spec() for t in model.config.tasks]
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=False, seed=0)
    metrics: dict[str, dict[str, float]] = {}
    outputs: dict[str, torch.Tensor] = {}
    for name in dtypes:
        cast = CastRankingModel(model, resolve_dtype(name))
        acc = RankingMetrics(tasks)
        parts = []
        for batch in make_ranking_dataloader(dataset, sampler):
            out = cast(batch).float()
            parts.append(out)
            acc.update(out, {t.name: batch.labels[t.label_name] for t in model.config.tasks}, batch.candidate_users)
        metrics[name] = acc.compute()
        outputs[name] = torch.cat(parts)
    ref = dtypes[0]
    return {
        "reference": ref,
        "metrics": metrics,
        "delta": {d: {k: metrics[d][k] - metrics[ref][k] for k in metrics[ref]} for d in dtypes},
        "max_abs_output_diff": {d: float((outputs[d] - outputs[ref]).abs().max()) for d in dtypes},
    }
