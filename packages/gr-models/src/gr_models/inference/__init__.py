"""KV-cached HSTU ranking inference: paged per-user K/V cache, delta-q appends, micro-batched candidate scoring.

API for the serving helper (``gr_models.serving`` builds on this; one call at a time per scorer)::

    from gr_models.inference import CachedRankingScorer, Candidates, KVCache, UserEvents, UserRequest

    cache = KVCache.for_encoder(model.config.hstu, budget_bytes=2 << 30, device="cpu", dtype=torch.bfloat16)
    scorer = CachedRankingScorer(model, cache, micro_batch=64, dtype=torch.bfloat16, model_version="ckpt-123")
    scores = scorer.score(
        user_id,                                   # any hashable
        user_features=[3, 1, 0, 7],                # one int per model.config.features.user_feature_names
        new_events=UserEvents.from_lists(items=[5, 9], actions=[4, 2], timestamps=[1700000000, 1700000100],
                                         bags=[[1, 2], [3]]),   # or None; bags None when the model has none
        candidates=Candidates.from_lists(items=[11, 12, 13], bags=[[1], [], [2]]),  # timestamps default: request
        request_time=1700000200,
    )                                              # -> Tensor [3, num_tasks] (logits of binary tasks), scorer dtype
    scorer.score_many([UserRequest(user_id, feats, events, candidates, t), (other_id, ...), ...])
        # -> [Tensor | InferenceInputError, ...]: result i == score(*requests[i]) called in order; the group's
        #    prefix updates run as one jagged delta-q encoder pass, all its candidate micro-batches as another
        #    (a few changed rows, e.g. the last token at a new request time, ride along: one pass per request)
    scorer.num_users                               # users whose history is kept (<= max_users)
    scorer.append(user_id, user_features, new_events)   # record events, update the cache, score nothing
    scorer.invalidate(user_id)                     # drop cached K/V (history kept);  scorer.forget(user_id): both
    scorer.full_recompute(user_features, history_events, candidates, request_time)  # uncached reference path
    scorer.stats, cache.stats()                    # counters: prefix reused/incremental/full, hits, evictions, bytes
    scorer.history(user_id)                        # UserHistory(user_features, events, dropped) or None

    CastRankingModel(model, "bf16")(batch)         # the batched model forward in bf16/fp16 (offline scoring, evals)
    gr_models.inference.precision.evaluate_dtypes(model, dataset)   # AUC/NE per dtype and deltas vs fp32

- The scorer keeps each user's events (the latest ``scorer.max_history_events``); a new user is a cold start (empty
  history). ``new_events`` must not predate the user's last event, and nothing may be after ``request_time``.
- Malformed input (wrong feature count, ids out of range, time order, too many candidates: ``max_candidates``)
  raises ``InferenceInputError`` (a ``ValueError``) naming the field, before any state changes.
- The history window is the latest ``max_history_events = (max_seq_len - F - 1) // tokens_per_event`` events;
  micro-batches may run past ``max_seq_len`` (each candidate still sees only ``[prefix | itself]``).
- Exact incremental appends need ``HSTURankingConfig.context_attention="causal"``; "full" models (the default) are
  served exactly too but, with user features, recompute the whole prefix on each append and (with the relative
  bias) on each new request time: ``scorer.stats.full_fallback_reasons`` counts why (``gr_models.inference.scorer``).
- ``score_many``: a malformed request gets its ``InferenceInputError`` in its slot (returned, not raised), changes
  nothing, and the others are scored as without it; a user repeated in the list splits it into runs of distinct users,
  applied in order. The attention op takes a delta-q pass's relative bias as a full ``[B, 1, N, N]`` square (B
  sequences, N the longest): a pass packs sequences, longest first, while ``B * N * N * itemsize <=
  max_batch_bias_bytes`` (default 256 MiB; a longer sequence runs alone). Scores equal ``score``'s up to
  float summation order (fp32 within 1e-5).
- Not thread-safe: serialise calls to one scorer.
"""

from gr_models.inference.cast_model import CastRankingModel, resolve_dtype
from gr_models.inference.kv_cache import CacheCapacityError, CacheEntry, CacheStats, KVCache
from gr_models.inference.requests import Candidates, InferenceInputError, UserEvents
from gr_models.inference.scorer import (
    CachedRankingScorer,
    ScorerStats,
    UserHistory,
    UserRequest,
    model_fingerprint,
)

__all__ = [
    "CacheCapacityError",
    "CacheEntry",
    "CacheStats",
    "CachedRankingScorer",
    "Candidates",
    "CastRankingModel",
    "InferenceInputError",
    "KVCache",
    "ScorerStats",
    "UserEvents",
    "UserHistory",
    "UserRequest",
    "model_fingerprint",
    "resolve_dtype",
]
