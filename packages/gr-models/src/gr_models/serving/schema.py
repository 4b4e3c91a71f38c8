"""The JSON request of ``POST /score``, validated against the model's feature spec before anything runs.

Request body (a JSON object; unknown keys are an error)::

    {
      "user_id": "u42" | 42,                       # required: a string (1..256 chars) or an integer
      "user_features": [3, 1] | {"age": 3, ...},   # optional: one id per user feature (list in the model's order,
                                                   # or an object by name); absent: the user's last ones, zeros for
                                                   # a new user (the response says "user_features_defaulted")
      "events": {"items": [..], "actions": [..], "timestamps": [..], "bags": [[..], ..]},
                                                   # optional: events since the last call, oldest first; "bags"
                                                   # (one list per item) optional, empty when absent
      "candidates": {"items": [..], "bags": [[..], ..], "timestamps": [..]} | [item, ...],
                                                   # required, 1..max_candidates; timestamps default: request_time
      "request_time": 1700000000                   # optional unix seconds (default: the server clock)
    }

Every id is checked against its vocabulary, timestamps must be >= 0, events non-decreasing in time and not after
``request_time``; the first failure is answered 400 with a message naming the field. Per-user ordering (new events
not older than the user's last event) is checked by the scorer, also before any state changes.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from gr_models.inference.requests import Candidates, UserEvents
from gr_models.ranking.features import RankingFeatureSpec

MAX_USER_ID_CHARS = 256
MAX_TIMESTAMP = 1 << 62  # int64 with room for time differences
_TOP_LEVEL = {"user_id", "user_features", "events", "candidates", "request_time"}


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx/5xx) and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class RequestLimits:
    max_candidates: int = 1024
    max_events: int = 4096  # new events in one request
    max_bag_size: int = 64  # values in one item's bag


@dataclass(frozen=True)
class ScoreRequest:
    user_id: Hashable
    user_features: tuple[int, ...] | None  # None: the user's stored features (zeros for a new user)
    events: UserEvents
    candidates: Candidates
    request_time: int


def _bad(message: str) -> RequestError:
    return RequestError(400, message)


def _int(value: Any, field: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{field} must be an integer, got {type(value).__name__} {value!r:.40}")
    if lo is not None and value < lo:
        raise _bad(f"{field} = {value} must be >= {lo}")
    if hi is not None and value >= hi:
        raise _bad(f"{field} = {value} is out of range [{0 if lo is None else lo}, {hi})")
    return value


def _int_list(value: Any, field: str, lo: int | None = None, hi: int | None = None) -> list[int]:
    if not isinstance(value, list):
        raise _bad(f"{field} must be a list of integers, got {type(value).__name__}")
    return [_int(v, f"{field}[{i}]", lo, hi) for i, v in enumerate(value)]


def _object(value: Any, field: str, allowed: set[str], required: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(f"{field} must be a JSON object, got {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise _bad(f"{field} has unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(required - set(value))
    if missing:
        raise _bad(f"{field} is missing required field(s) {missing}")
    return value


def _bags(value: Any, field: str, n: int, spec: RankingFeatureSpec, limits: RequestLimits) -> list[list[int]] | None:
    if value is None:
        return None
    if spec.item_bag_size == 0:
        raise _bad(f"{field}: the model has no item bags")
    if not isinstance(value, list) or len(value) != n:
        got = len(value) if isinstance(value, list) else type(value).__name__
        raise _bad(f"{field} must be a list of {n} lists (one per item), got {got}")
    bags = []
    for i, bag in enumerate(value):
        ids = _int_list(bag, f"{field}[{i}]", 0, spec.item_bag_size)
        if len(ids) > limits.max_bag_size:
            raise _bad(f"{field}[{i}] has {len(ids)} values > {limits.max_bag_size}")
        bags.append(ids)
    return bags


def _user_id(value: Any) -> Hashable:
    if isinstance(value, str):
        if not 0 < len(value) <= MAX_USER_ID_CHARS:
            raise _bad(f"user_id must have 1..{MAX_USER_ID_CHARS} characters, got {len(value)}")
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if not -(1 << 63) <= value < 1 << 63:
            raise _bad("an integer user_id must fit in 64 bits")
        return value
    raise _bad(f"user_id must be a string or an integer, got {type(value).__name__}")


def _user_features(value: Any, spec: RankingFeatureSpec) -> tuple[int, ...] | None:
    if value is None:
        return None
    names, sizes = spec.user_feature_names, spec.user_feature_sizes
    if isinstance(value, dict):
        _object(value, "user_features", set(names), set(names))
        value = [value[n] for n in names]
    if not isinstance(value, list):
        raise _bad(f"user_features must be a list or an object of {len(names)} integers {list(names)}")
    if len(value) != len(names):
        raise _bad(f"user_features has {len(value)} values, the model expects {len(names)} {list(names)}")
    return tuple(_int(v, f"user_features.{n}", 0, s) for v, n, s in zip(value, names, sizes, strict=True))


def _events(value: Any, spec: RankingFeatureSpec, limits: RequestLimits, request_time: int) -> UserEvents:
    if value is None:
        return UserEvents.empty()
    ev = _object(value, "events", {"items", "actions", "timestamps", "bags"}, {"items", "actions", "timestamps"})
    items = _int_list(ev["items"], "events.items", 0, spec.num_items)
    n = len(items)
    if n > limits.max_events:
        raise _bad(f"events has {n} items > max_events={limits.max_events}")
    actions = _int_list(ev["actions"], "events.actions", 0, spec.num_actions)
    timestamps = _int_list(ev["timestamps"], "events.timestamps", 0, MAX_TIMESTAMP)
    if len(actions) != n or len(timestamps) != n:
        raise _bad(f"events.items/actions/timestamps differ in length: {n}, {len(actions)}, {len(timestamps)}")
    for i in range(1, n):
        if timestamps[i] < timestamps[i - 1]:
            raise _bad(f"events.timestamps must be non-decreasing (oldest first): [{i - 1}]={timestamps[i - 1]} > "
                       f"[{i}]={timestamps[i]}")  # fmt: skip
    if n and timestamps[-1] > request_time:
        raise _bad(f"events.timestamps[{n - 1}] = {timestamps[-1]} is after request_time = {request_time}")
    return UserEvents.from_lists(items, actions, timestamps, _bags(ev.get("bags"), "events.bags", n, spec, limits))


def _candidates(value: Any, spec: RankingFeatureSpec, limits: RequestLimits) -> Candidates:
    if isinstance(value, list):
        value = {"items": value}
    cand = _object(value, "candidates", {"items", "bags", "timestamps"}, {"items"})
    items = _int_list(cand["items"], "candidates.items", 0, spec.num_items)
    m = len(items)
    if m == 0:
        raise _bad("candidates.items is empty: nothing to score")
    if m > limits.max_candidates:
        raise _bad(f"{m} candidates > max_candidates={limits.max_candidates}")
    ts = cand.get("timestamps")
    if ts is not None:
        ts = _int_list(ts, "candidates.timestamps", 0, MAX_TIMESTAMP)
        if len(ts) != m:
            raise _bad(f"candidates.timestamps has {len(ts)} values for {m} items")
    return Candidates.from_lists(items, _bags(cand.get("bags"), "candidates.bags", m, spec, limits), ts)


def parse_score_request(body: Any, spec: RankingFeatureSpec, limits: RequestLimits) -> ScoreRequest:
    """Validates a decoded JSON body; raises ``RequestError`` (400) naming the first bad field."""
    body = _object(body, "request body", _TOP_LEVEL, {"user_id", "candidates"})
    user_id = _user_id(body["user_id"])
    request_time = body.get("request_time")
    request_time = int(time.time()) if request_time is None else _int(request_time, "request_time", 0, MAX_TIMESTAMP)
    features = _user_features(body.get("user_features"), spec)
    events = _events(body.get("events"), spec, limits, request_time)
    candidates = _candidates(body["candidates"], spec, limits)
    return ScoreRequest(user_id, features, events, candidates, request_time)
