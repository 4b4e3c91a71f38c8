"""Backends from files: a model bundle (cached scorer) or an AOTInductor scoring package (full recompute)."""

from __future__ import annotations

from pathlib import Path

import torch

from gr_models.inference import CachedRankingScorer, KVCache, model_fingerprint
from gr_models.inference.export import load_scoring_package
from gr_models.ranking.hstu_ranking import HSTURankingModel
from gr_models.serving.backends import CachedBackend, UncachedBackend
from gr_models.serving.bundle import load_bundle
from gr_models.serving.eager import BatchedModelScorer


def cached_backend(
    model: HSTURankingModel,
    *,
    model_version: str | None = None,
    dtype: str | torch.dtype = "fp32",
    cache_bytes: int = 512 << 20,
    micro_batch: int = 64,
    max_candidates: int = 1024,
    max_users: int = 100_000,
) -> CachedBackend:
    scorer_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, dtype)
    cache = KVCache.for_encoder(model.config.hstu, budget_bytes=cache_bytes, device="cpu", dtype=scorer_dtype)
    scorer = CachedRankingScorer(
        model.eval(),
        cache,
        micro_batch=micro_batch,
        dtype=scorer_dtype,
        model_version=model_version,
        max_candidates=max_candidates,
        max_users=max_users,
    )
    return CachedBackend(scorer)


def eager_backend(
    model: HSTURankingModel,
    *,
    model_version: str | None = None,
    dtype: str | torch.dtype = "fp32",
    max_users: int = 100_000,
) -> UncachedBackend:
    """Full recompute with the plain model, the batcher's groups of users in one forward each."""
    scorer = BatchedModelScorer(model, dtype)
    cfg = model.config
    return UncachedBackend(
        scorer,
        cfg.features,
        cfg.tasks,
        model_fingerprint(model) if model_version is None else model_version,
        max_seq_len=cfg.max_seq_len,
        tokens_per_event=cfg.tokens_per_event,
        max_users=max_users,
        name="eager",
        score_many=scorer.many,
    )


def backend_from_bundle(path: str | Path, mode: str = "cached", **options: object) -> CachedBackend | UncachedBackend:
    """``mode="cached"``: the KV-cached scorer (options of ``cached_backend``); ``"eager"``: batched full
    recompute (options of ``eager_backend``)."""
    bundle = load_bundle(path)
    if mode == "cached":
        return cached_backend(bundle.model, model_version=bundle.model_version, **options)  # type: ignore[arg-type]
    if mode == "eager":
        return eager_backend(bundle.model, model_version=bundle.model_version, **options)  # type: ignore[arg-type]
    raise ValueError(f"mode must be 'cached' or 'eager', got {mode!r}")


def backend_from_package(path: str | Path, *, max_users: int = 100_000) -> UncachedBackend:
    scorer = load_scoring_package(path)
    spec = scorer.spec
    return UncachedBackend(
        scorer,
        spec.features,
        spec.tasks,
        spec.model_version,
        max_seq_len=spec.max_seq_len,
        tokens_per_event=spec.tokens_per_event,
        max_users=max_users,
        name="exported",
    )
