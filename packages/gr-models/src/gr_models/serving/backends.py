"""What the HTTP layer scores with: a ``ScoringBackend`` takes validated requests and returns task outputs.

- ``CachedBackend``: ``gr_models.inference.CachedRankingScorer`` (per-user K/V cache, delta-q appends,
  micro-batched candidates) on a model loaded from a bundle; the scorer keeps each user's history. A batcher group
  is one ``score_many`` call (one jagged encoder pass for the group's prefix updates, one for all its candidates),
  or one per run of distinct users when a user repeats within the group.
- ``UncachedBackend``: any full-recompute scoring function (an AOTInductor package from
  ``gr_models.inference.export``, or the eager ``ScoringGraph``) plus a ``HistoryStore`` of each user's events.
  Candidates are scored in chunks that fit the model's window next to the history (candidates are independent
  targets, so chunking changes nothing); the history window matches the cached scorer's.

A backend is called from one worker thread only (``DynamicBatcher``), so it need not be thread-safe. Bad per-user
input raises ``InferenceInputError`` before any state changes; the batcher answers it 400.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from gr_models.inference.requests import Candidates, InferenceInputError, UserEvents
from gr_models.inference.scorer import CachedRankingScorer, UserRequest
from gr_models.ranking.features import RankingFeatureSpec
from gr_models.ranking.tasks import RankingTask
from gr_models.serving.schema import ScoreRequest


@dataclass
class ScoreResult:
    scores: torch.Tensor  # float32 [M, num_tasks]: logits of binary tasks, values of regression tasks
    user_features_defaulted: bool  # a new user without user_features: zeros were used
    history_events: int  # events of the user's history window after this request


class ScoringBackend(Protocol):
    name: str
    model_version: str
    features: RankingFeatureSpec
    tasks: tuple[RankingTask, ...]

    def score_batch(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult | Exception]:
        """One result (or the exception that request raised) per request, in order; requests of one user are
        applied in order."""
        ...

    def stats(self) -> dict[str, Any]: ...


def _features(request: ScoreRequest, known: torch.Tensor | None, num_features: int) -> tuple[torch.Tensor, bool]:
    if request.user_features is not None:
        return torch.tensor(request.user_features, dtype=torch.int64), False
    if known is not None:
        return known, False
    return torch.zeros(num_features, dtype=torch.int64), True


def distinct_user_runs(requests: Sequence[ScoreRequest]) -> list[list[int]]:
    """Indices of ``requests`` in consecutive runs of distinct users: a user seen earlier in the run starts a new
    one, so runs taken in order apply each user's requests in order."""
    runs: list[list[int]] = []
    seen: set[Hashable] = set()
    for i, request in enumerate(requests):
        if not runs or request.user_id in seen:
            runs.append([])
            seen = set()
        runs[-1].append(i)
        seen.add(request.user_id)
    return runs


class CachedBackend:
    """Requests through a ``CachedRankingScorer``: one ``score_many`` call per run of distinct users of a group.

    A request without ``user_features`` takes the user's stored ones (zeros for a new user); runs split at a
    repeated user so that a later request of a user sees what the earlier one stored (features, events)."""

    name = "cached"

    def __init__(self, scorer: CachedRankingScorer) -> None:
        self.scorer = scorer
        cfg = scorer.model.config
        self.model_version = scorer.model_version
        self.features = cfg.features
        self.tasks = tuple(cfg.tasks)
        self.score_many_calls = 0

    def score_one(self, request: ScoreRequest) -> ScoreResult:
        """One request alone; raises its error."""
        [result] = self.score_batch([request])
        if isinstance(result, Exception):
            raise result
        return result

    def score_batch(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult | Exception]:
        results: list[ScoreResult | Exception | None] = [None] * len(requests)
        for run in distinct_user_runs(requests):
            self._score_run([requests[i] for i in run], run, results)
        return results  # type: ignore[return-value]

    def _score_run(self, run: list[ScoreRequest], indices: list[int], results: list) -> None:
        """Requests of distinct users in one ``score_many`` call; errors are reported per request (a malformed one
        changes nothing and the others are scored), an unexpected failure of the call for each of them."""
        calls, defaulted = [], []
        for request in run:
            hist = self.scorer.history(request.user_id)
            feats, was_defaulted = _features(
                request, None if hist is None else hist.user_features, self.features.num_user_features
            )
            events = request.events if len(request.events) else None
            calls.append(UserRequest(request.user_id, feats, events, request.candidates, request.request_time))
            defaulted.append(was_defaulted)
        try:
            outs = self.scorer.score_many(calls)
        except Exception as exc:  # not the requests' fault: every request of the call gets it (500)
            for i in indices:
                results[i] = exc
            return
        if not all(isinstance(out, Exception) for out in outs):  # calls that scored something (stats unchanged
            self.score_many_calls += 1  # by malformed requests)
        for i, request, was_defaulted, out in zip(indices, run, defaulted, outs, strict=True):
            if isinstance(out, Exception):
                results[i] = out
                continue
            hist = self.scorer.history(request.user_id)
            results[i] = ScoreResult(out.float(), was_defaulted, 0 if hist is None else len(hist.events))

    def stats(self) -> dict[str, Any]:
        cache = self.scorer.cache.stats()
        return {
            "users": self.scorer.num_users,
            "score_many_calls": self.score_many_calls,
            "cache": {**asdict(cache), "hit_rate": round(cache.hit_rate, 4)},
            "scorer": asdict(self.scorer.stats),
        }


@dataclass
class _StoredUser:
    features: torch.Tensor
    events: UserEvents


class HistoryStore:
    """Each user's features and latest ``max_events`` events (LRU over at most ``max_users`` users).

    ``merged`` computes a user's history after a request without storing it; ``commit`` stores it once the
    request has been scored, so a failed request leaves the store as it was."""

    def __init__(self, max_events: int, max_users: int = 100_000) -> None:
        if max_events < 0 or max_users < 1:
            raise ValueError(f"max_events must be >= 0 and max_users >= 1, got {max_events}, {max_users}")
        self.max_events = max_events
        self.max_users = max_users
        self._users: OrderedDict[Hashable, _StoredUser] = OrderedDict()

    def __len__(self) -> int:
        return len(self._users)

    def features(self, user_id: Hashable) -> torch.Tensor | None:
        user = self._users.get(user_id)
        return None if user is None else user.features

    def events(self, user_id: Hashable) -> UserEvents:
        user = self._users.get(user_id)
        return UserEvents.empty() if user is None else user.events

    def merged(self, user_id: Hashable, new_events: UserEvents, request_time: int) -> UserEvents:
        old = self.events(user_id)
        last = old.last_timestamp
        if last is not None and len(new_events) and int(new_events.timestamps[0]) < last:
            raise InferenceInputError(
                f"new events start at t={int(new_events.timestamps[0])}, before the user's last event (t={last})"
            )
        if last is not None and request_time < last:
            raise InferenceInputError(f"request_time {request_time} is before the user's last event (t={last})")
        return old.concat(new_events).tail(self.max_events) if len(new_events) else old

    def commit(self, user_id: Hashable, features: torch.Tensor, events: UserEvents) -> None:
        self._users[user_id] = _StoredUser(features.clone(), events)
        self._users.move_to_end(user_id)
        while len(self._users) > self.max_users:
            self._users.popitem(last=False)


ScoreFn = Callable[[torch.Tensor, UserEvents, Candidates, int], torch.Tensor]
# Several users' windows (features, history, candidates, request time) in one call: one result per window.
ScoreManyFn = Callable[[Sequence[tuple[torch.Tensor, UserEvents, Candidates, int]]], list[torch.Tensor]]


class UncachedBackend:
    """Full recompute per request with ``score_fn(features, history, candidates, request_time) -> [M, T]``.

    ``max_seq_len``/``tokens_per_event`` are the model's window: candidates go in chunks of
    ``max_seq_len - F - tokens_per_event * history`` (at least 1, as the history window leaves room for one).

    With ``score_many`` (e.g. ``BatchedModelScorer.many``), a group's requests run in rounds of distinct users
    (a user's later requests wait for the next round, so they apply in order), and the windows of a round that fit
    ``max_seq_len`` whole go through one ``score_many`` call; the others are scored alone in chunks."""

    def __init__(
        self,
        score_fn: ScoreFn,
        features: RankingFeatureSpec,
        tasks: Sequence[RankingTask],
        model_version: str,
        *,
        max_seq_len: int,
        tokens_per_event: int,
        max_users: int = 100_000,
        name: str = "uncached",
        score_many: ScoreManyFn | None = None,
    ) -> None:
        self.score_fn = score_fn
        self.score_many = score_many
        self.features = features
        self.tasks = tuple(tasks)
        self.model_version = model_version
        self.name = name
        self.max_seq_len = max_seq_len
        self.tokens_per_event = tokens_per_event
        f = features.num_user_features
        self.store = HistoryStore((max_seq_len - f - 1) // tokens_per_event, max_users)
        self.requests = 0
        self.window_calls = 0
        self.batched_calls = 0

    def score_one(self, request: ScoreRequest) -> ScoreResult:
        feats, defaulted = _features(request, self.store.features(request.user_id), self.features.num_user_features)
        history = self.store.merged(request.user_id, request.events, request.request_time)
        room = self.max_seq_len - self.features.num_user_features - self.tokens_per_event * len(history)
        cands = request.candidates
        outs = []
        for start in range(0, len(cands), room):
            chunk = cands.slice(start, min(start + room, len(cands)))
            outs.append(self.score_fn(feats, history, chunk, request.request_time))
            self.window_calls += 1
        scores = torch.cat(outs).float()
        self.store.commit(request.user_id, feats, history)
        self.requests += 1
        return ScoreResult(scores, defaulted, len(history))

    def score_batch(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult | Exception]:
        results: list[ScoreResult | Exception | None] = [None] * len(requests)
        pending = list(enumerate(requests))
        while pending:
            round_, later, seen = [], [], set()
            for i, request in pending:
                (later if request.user_id in seen else round_).append((i, request))
                seen.add(request.user_id)
            self._score_round(round_, results)
            pending = later
        return results  # type: ignore[return-value]

    def _score_round(self, round_: list[tuple[int, ScoreRequest]], results: list) -> None:
        """Requests of distinct users: the windows that fit go through ``score_many`` together."""
        whole = []  # (index, request, features, defaulted, history)
        for i, request in round_:
            try:
                if self.score_many is None:
                    results[i] = self.score_one(request)
                    continue
                feats, defaulted = _features(
                    request, self.store.features(request.user_id), self.features.num_user_features
                )
                history = self.store.merged(request.user_id, request.events, request.request_time)
                need = self.features.num_user_features + self.tokens_per_event * len(history) + len(request.candidates)
                if need > self.max_seq_len:
                    results[i] = self.score_one(request)
                else:
                    whole.append((i, request, feats, defaulted, history))
            except Exception as exc:
                results[i] = exc
        if not whole:
            return
        try:
            outs = self.score_many([(f, h, r.candidates, r.request_time) for _, r, f, _, h in whole])
            self.batched_calls += 1
        except Exception as exc:
            for i, *_ in whole:
                results[i] = exc
            return
        for (i, request, feats, defaulted, history), out in zip(whole, outs, strict=True):
            self.store.commit(request.user_id, feats, history)
            self.requests += 1
            results[i] = ScoreResult(out.float(), defaulted, len(history))

    def stats(self) -> dict[str, Any]:
        return {
            "users": len(self.store),
            "requests": self.requests,
            "batched_calls": self.batched_calls,
            "window_calls": self.window_calls,
        }
