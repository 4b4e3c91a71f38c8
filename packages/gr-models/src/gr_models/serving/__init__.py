"""Serving: ``gr-serve`` answers JSON scoring requests over HTTP (stdlib ``ThreadingHTTPServer``).

- ``bundle``: the model-bundle file (config + weights + version) that trainers write and the server loads;
- ``schema``: the ``POST /score`` request and its validation (400 naming the bad field);
- ``backends``: what scores: ``CachedBackend`` (``gr_models.inference.CachedRankingScorer``) or ``UncachedBackend``
  (full recompute: an AOTInductor package from ``gr_models.inference.export``, or ``eager.BatchedModelScorer``,
  which runs each batch of users through one forward of the plain model);
- ``batcher``: a queue and one worker that takes concurrent requests in groups (and serialises the scorer);
- ``server``: routes ``GET /health`` and ``POST /score``; ``cli``: the ``gr-serve`` command.

A rejected request changes nothing: the request is validated before it is queued, and the scorers check per-user
input (time order) before touching their history or cache.
"""

from gr_models.serving.backends import CachedBackend, HistoryStore, ScoreResult, ScoringBackend, UncachedBackend
from gr_models.serving.batcher import DynamicBatcher
from gr_models.serving.bundle import BundleError, ModelBundle, load_bundle, save_bundle
from gr_models.serving.eager import BatchedModelScorer, ranking_batch
from gr_models.serving.loading import backend_from_bundle, backend_from_package, cached_backend, eager_backend
from gr_models.serving.schema import RequestError, RequestLimits, ScoreRequest, parse_score_request
from gr_models.serving.server import ScoringServer

__all__ = [
    "BatchedModelScorer",
    "BundleError",
    "CachedBackend",
    "DynamicBatcher",
    "HistoryStore",
    "ModelBundle",
    "RequestError",
    "RequestLimits",
    "ScoreRequest",
    "ScoreResult",
    "ScoringBackend",
    "ScoringServer",
    "UncachedBackend",
    "backend_from_bundle",
    "backend_from_package",
    "cached_backend",
    "eager_backend",
    "load_bundle",
    "parse_score_request",
    "ranking_batch",
    "save_bundle",
]
