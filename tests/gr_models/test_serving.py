"""gr-serve end to end on an ephemeral loopback port: health, scores equal to the plain model, concurrent (batched)
requests equal sequential ones, every malformed request answered with its 4xx and nothing changed by it, 5xx
without a traceback, cold start, model bundles, the CLI."""

from __future__ import annotations

import http.client
import json
import logging
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from gr_models.inference import CachedRankingScorer, Candidates, KVCache, UserEvents
from gr_models.inference.export import ScoringGraph
from gr_models.modules.hstu import HSTUConfig
from gr_models.ranking import HSTURankingConfig, HSTURankingModel, RankingFeatureSpec, RankingTask
from gr_models.serving import (
    BundleError,
    RequestLimits,
    ScoringServer,
    UncachedBackend,
    backend_from_bundle,
    cached_backend,
    eager_backend,
    load_bundle,
    save_bundle,
)

SPEC = RankingFeatureSpec(50, 5, ("age", "sex"), (7, 2), "genre", 6)
TASKS = [RankingTask("like", "binary"), RankingTask("rating", "regression")]
MAX_CANDIDATES = 20


def make_model(context: str = "causal", seed: int = 0) -> HSTURankingModel:
    torch.manual_seed(seed)
    cfg = HSTURankingConfig(
        SPEC,
        TASKS,
        embedding_dim=16,
        max_seq_len=64,
        head_hidden=8,
        context_attention=context,
        hstu=HSTUConfig(num_blocks=2, num_heads=2, alpha=0.5),
    )
    model = HSTURankingModel(cfg).eval()
    with torch.no_grad():  # larger-than-init weights: every input visibly moves the scores
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


MODEL = make_model()


def serve(model: HSTURankingModel = MODEL, kind: str = "cached", **server_options: Any) -> ScoringServer:
    if kind == "cached":
        backend = cached_backend(model, model_version="test-v1", cache_bytes=4 << 20, max_candidates=MAX_CANDIDATES)
    else:
        backend = eager_backend(model, model_version="test-v1")
    return ScoringServer(backend, limits=RequestLimits(max_candidates=MAX_CANDIDATES), **server_options)


def call(server: ScoringServer, method: str, path: str, body: Any = None, headers: dict | None = None) -> tuple:
    """(status, decoded JSON) of one request; ``body`` bytes are sent as is, anything else as JSON."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def request(user: Any, items: list[int], t: int, events: list[tuple[int, int, int]] = (), **extra: Any) -> dict:
    body: dict[str, Any] = {"user_id": user, "candidates": {"items": items}, "request_time": t, **extra}
    if events:
        body["events"] = {k: [e[i] for e in events] for i, k in enumerate(("items", "actions", "timestamps"))}
    body.setdefault("user_features", [3, 1])
    return body


def reference(feats: list[int], events: list[tuple[int, int, int]], items: list[int], t: int) -> list[dict]:
    """The plain model's forward (uncached, un-batched) as the server reports it (binary tasks as probabilities)."""
    scorer = CachedRankingScorer(MODEL, KVCache.for_encoder(MODEL.config.hstu, budget_bytes=1 << 20))
    hist = UserEvents.from_lists(*([e[i] for e in events] for i in range(3))) if events else UserEvents.empty()
    out = scorer.full_recompute(feats, hist, Candidates.from_lists(items), t)
    return [{"like": torch.sigmoid(row[0]).item(), "rating": row[1].item()} for row in out]


def assert_scores_close(got: list[dict], want: list[dict], tol: float = 1e-5) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys() and all(abs(g[k] - w[k]) <= tol for k in w), (g, w)


def test_health_reports_version_tasks_and_cache_stats() -> None:
    with serve() as server:
        status, health = call(server, "GET", "/health")
        assert status == 200 and health["status"] == "ok" and health["model_version"] == "test-v1"
        assert health["backend"] == "cached" and [t["name"] for t in health["tasks"]] == ["like", "rating"]
        assert health["backend_stats"]["cache"]["entries"] == 0 and health["users"] == 0
        assert call(server, "POST", "/score", request("u", [1, 2], 100))[0] == 200
        assert call(server, "POST", "/score", request("v", [1, 99], 100))[0] == 400  # a bad new user is not kept
        after = call(server, "GET", "/health")[1]
        assert after["backend_stats"]["cache"]["entries"] == 1 and after["backend_stats"]["scorer"]["requests"] == 1
        assert after["users"] == after["backend_stats"]["users"] == server.backend.scorer.num_users == 1
        assert after["batcher"]["requests"] == 1


def test_score_matches_the_plain_model_across_calls() -> None:
    ev1 = [(5, 1, 10), (6, 2, 20), (7, 4, 30)]
    ev2 = [(8, 0, 40), (9, 3, 50)]
    with serve() as server:
        status, out = call(server, "POST", "/score", request("alice", [1, 2, 3], 35, ev1))
        assert status == 200 and out["user_id"] == "alice" and out["tasks"] == ["like", "rating"]
        assert out["history_events"] == 3 and not out["user_features_defaulted"]
        assert_scores_close(out["scores"], reference([3, 1], ev1, [1, 2, 3], 35))
        # Second call: new events only; the server remembers the first three (and the user features).
        body = request("alice", [4, 1], 60, ev2)
        del body["user_features"]
        status, out = call(server, "POST", "/score", body)
        assert status == 200 and out["history_events"] == 5
        assert_scores_close(out["scores"], reference([3, 1], ev1 + ev2, [4, 1], 60))
        # Candidates as a bare list, with bags: the same path.
        status, out = call(server, "POST", "/score", {"user_id": "alice", "candidates": [4, 1], "request_time": 60})
        assert status == 200
        assert_scores_close(out["scores"], reference([3, 1], ev1 + ev2, [4, 1], 60))


def test_unknown_user_is_a_cold_start() -> None:
    with serve() as server:
        status, out = call(server, "POST", "/score", {"user_id": 12345, "candidates": [7, 8], "request_time": 5})
        assert status == 200 and out["history_events"] == 0 and out["user_features_defaulted"]
        assert_scores_close(out["scores"], reference([0, 0], [], [7, 8], 5))


def _user_script(u: int) -> list[dict]:
    """Three requests of user ``u``: events, then more events, then none (a cache hit)."""
    base = 1000 * u
    e1 = [((u * 7 + i) % 50, i % 5, base + 10 * i) for i in range(4 + u)]
    e2 = [((u * 3 + i) % 50, (i + u) % 5, base + 100 + i) for i in range(2)]
    return [
        request(f"user{u}", [(u + j) % 50 for j in range(3 + u)], base + 95, e1, user_features=[u % 7, u % 2]),
        request(f"user{u}", [1, 2, 3, u], base + 200, e2),
        request(f"user{u}", [u, 40, 41], base + 300),
    ]


@pytest.mark.parametrize("kind", ["cached", "eager"])
def test_concurrent_batched_requests_equal_sequential_ones(kind: str) -> None:
    """Concurrent requests grouped by the batcher (the eager backend runs each group's users in one forward) give
    the sequential answers of the cached scorer."""
    users = range(6)
    scripts = {u: _user_script(u) for u in users}
    with serve(max_batch=1, batch_window_ms=0) as server:
        sequential = {u: [call(server, "POST", "/score", body) for body in scripts[u]] for u in users}
    answers: dict[int, list] = {u: [] for u in users}
    barrier = threading.Barrier(len(users))

    def client(server: ScoringServer, u: int) -> None:
        for body in scripts[u]:
            barrier.wait()  # every round's requests arrive together
            answers[u].append(call(server, "POST", "/score", body))

    with serve(kind=kind, max_batch=16, batch_window_ms=50) as server:
        threads = [threading.Thread(target=client, args=(server, u)) for u in users]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        health = call(server, "GET", "/health")[1]
    batcher = health["batcher"]
    assert batcher["requests"] == 18 and batcher["largest_batch"] > 1  # requests really were grouped
    if kind == "eager":  # and computed together: fewer forwards than requests
        assert health["backend_stats"]["requests"] == 18 and health["backend_stats"]["batched_calls"] < 18
    else:  # one score_many call per group, hence fewer encoder passes than two per request
        stats = health["backend_stats"]
        assert stats["scorer"]["requests"] == 18 and stats["score_many_calls"] < 18
        assert stats["scorer"]["encoder_passes"] < 2 * 18
    assert health["users"] == len(users)
    for u in users:
        for (s_status, s_out), (c_status, c_out) in zip(sequential[u], answers[u], strict=True):
            assert s_status == c_status == 200 and s_out["history_events"] == c_out["history_events"]
            # Both backends run a group's users in one jagged pass: float summation order differs from one user.
            assert_scores_close(c_out["scores"], s_out["scores"], tol=1e-5)


GOOD = {"user_id": "bob", "user_features": [3, 1], "candidates": {"items": [1, 2]}, "request_time": 1000}
GOOD_EVENTS = {"items": [4], "actions": [1], "timestamps": [900]}


def _with(**changes: Any) -> dict:
    body = {**GOOD, "events": dict(GOOD_EVENTS)}
    for key, value in changes.items():
        if "__" in key:
            outer, inner = key.split("__")
            body[outer] = {**body[outer], inner: value}
        elif value is None:
            body.pop(key)
        else:
            body[key] = value
    return body


MALFORMED = [
    ("bad json", b"{not json", "not valid JSON"),
    ("not an object", [1, 2], "request body must be a JSON object"),
    ("missing user_id", _with(user_id=None), "missing required field(s) ['user_id']"),
    ("missing candidates", _with(candidates=None), "missing required field(s) ['candidates']"),
    ("unknown field", _with(extra=1), "unknown field(s) ['extra']"),
    ("user_id float", _with(user_id=1.5), "user_id must be a string or an integer"),
    ("user_id bool", _with(user_id=True), "user_id must be a string or an integer"),
    ("user_id empty", _with(user_id=""), "user_id must have 1..256 characters"),
    ("no candidates", _with(candidates__items=[]), "candidates.items is empty"),
    ("candidate id too large", _with(candidates__items=[1, 50]), "candidates.items[1] = 50 is out of range [0, 50)"),
    ("negative candidate id", _with(candidates__items=[-1]), "candidates.items[0] = -1 must be >= 0"),
    ("candidate id float", _with(candidates__items=[1.0]), "candidates.items[0] must be an integer"),
    ("candidate id string", _with(candidates__items=["3"]), "candidates.items[0] must be an integer"),
    ("candidates not a list", _with(candidates__items=3), "candidates.items must be a list"),
    ("too many candidates", _with(candidates__items=[1] * (MAX_CANDIDATES + 1)), "max_candidates=20"),
    ("candidate bag count", _with(candidates__bags=[[1]]), "candidates.bags must be a list of 2 lists"),
    ("candidate bag value", _with(candidates__bags=[[1], [6]]), "candidates.bags[1][0] = 6 is out of range"),
    ("candidate timestamps count", _with(candidates__timestamps=[5]), "candidates.timestamps has 1 values"),
    ("negative timestamp", _with(events__timestamps=[-5]), "events.timestamps[0] = -5 must be >= 0"),
    ("huge timestamp", _with(events__timestamps=[2**70]), "events.timestamps[0]"),
    ("event lengths differ", _with(events__actions=[1, 2]), "differ in length"),
    ("events unsorted", _with(events=dict(items=[1, 2], actions=[0, 0], timestamps=[20, 10])), "non-decreasing"),
    ("event after request", _with(events__timestamps=[1001]), "after request_time = 1000"),
    ("event id out of range", _with(events__items=[77]), "events.items[0] = 77 is out of range"),
    ("action out of range", _with(events__actions=[5]), "events.actions[0] = 5 is out of range [0, 5)"),
    (
        "events missing actions",
        _with(events={"items": [1], "timestamps": [1]}),
        "missing required field(s) ['actions']",
    ),
    ("events not an object", _with(events=[1, 2]), "events must be a JSON object"),
    ("feature count", _with(user_features=[1]), "user_features has 1 values, the model expects 2"),
    ("feature out of range", _with(user_features=[3, 2]), "user_features.sex = 2 is out of range [0, 2)"),
    ("feature object missing a name", _with(user_features={"age": 1}), "missing required field(s) ['sex']"),
    ("negative request time", _with(request_time=-1), "request_time = -1 must be >= 0"),
    ("request time string", _with(request_time="now"), "request_time must be an integer"),
    # Valid on their own, refused by the user's state (his last event is at t=500): checked by the scorer.
    ("events older than the user's last", _with(events__timestamps=[400]), "before the user's last event"),
    ("request before the user's last event", _with(events=None, request_time=450), "before the user's last event"),
]


def test_malformed_requests_get_their_4xx_and_change_nothing() -> None:
    seed = request("bob", [1], 500, [(3, 1, 100), (4, 2, 500)])
    follow_up = request("bob", [5, 6, 7], 2000, [(9, 0, 1500)])
    with serve() as twin:  # never sees a bad request
        call(twin, "POST", "/score", seed)
        want = call(twin, "POST", "/score", follow_up)
    with serve() as server:
        assert call(server, "POST", "/score", seed)[0] == 200
        scorer = server.backend.scorer
        before_stats = call(server, "GET", "/health")[1]["backend_stats"]
        before_events = scorer.history("bob").events
        before_k, before_v = scorer.cache.read("bob")
        for name, body, message in MALFORMED:
            status, out = call(server, "POST", "/score", body)
            assert status == 400, (name, status, out)
            assert out["status"] == 400 and message in out["error"], (name, out["error"])
        assert call(server, "GET", "/health")[1]["backend_stats"] == before_stats
        after_events = scorer.history("bob").events
        for name in ("items", "actions", "timestamps", "bag_values", "bag_lengths"):
            assert torch.equal(getattr(after_events, name), getattr(before_events, name))
        after_k, after_v = scorer.cache.read("bob")
        assert torch.equal(after_k, before_k) and torch.equal(after_v, before_v)
        assert scorer.history("user-never-seen") is None
        got = call(server, "POST", "/score", follow_up)
    assert got[0] == want[0] == 200
    assert_scores_close(got[1]["scores"], want[1]["scores"], tol=0.0)


def test_http_level_errors() -> None:
    with serve(max_body_bytes=1000) as server:
        assert call(server, "GET", "/nope")[0] == 404
        assert call(server, "POST", "/nope", GOOD)[0] == 404
        assert call(server, "GET", "/score")[0] == 405
        assert call(server, "POST", "/health", {})[0] == 405
        status, out = call(server, "POST", "/score", GOOD, headers={"Content-Type": "text/plain"})
        assert status == 415 and "application/json" in out["error"]
        status, out = call(server, "POST", "/score", {**GOOD, "candidates": [1] * 600})
        assert status == 413 and "limit 1000" in out["error"]
        conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
        conn.putrequest("POST", "/score")
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 411 and "Content-Length" in json.loads(resp.read())["error"]
        conn.close()
        assert call(server, "POST", "/score", GOOD)[0] == 200  # still serving


class _BrokenBackend:
    name = "broken"
    model_version = "x"
    features = SPEC
    tasks = tuple(TASKS)

    def score_batch(self, requests: list) -> list:
        return [RuntimeError("secret internal detail /etc/passwd") for _ in requests]

    def stats(self) -> dict:
        raise ValueError("stats exploded")


def test_internal_errors_are_500_without_a_traceback_and_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="gr_models.serving.server"), ScoringServer(_BrokenBackend()) as server:
        for method, path, body in (("POST", "/score", GOOD), ("GET", "/health", None)):
            status, out = call(server, method, path, body)
            assert status == 500 and out["error"].startswith("internal error (incident ")
            assert "secret" not in out["error"] and "exploded" not in out["error"] and "Traceback" not in out["error"]
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "secret internal detail" in logged and "stats exploded" in logged and "Traceback" in logged


def test_uncached_backend_equals_the_cached_one_with_chunked_candidates() -> None:
    """Full recompute (the eager export graph; the batched plain model) with a history that leaves room for only a
    few candidates per window: candidates are scored in chunks, results equal the cached scorer's."""
    graph = ScoringGraph(MODEL)

    def score_fn(feats: torch.Tensor, hist: UserEvents, cands: Candidates, t: int) -> torch.Tensor:
        from gr_models.inference.export import scoring_inputs

        with torch.no_grad():
            return graph(*scoring_inputs(feats, hist, cands, t))

    uncached = UncachedBackend(score_fn, SPEC, TASKS, "v", max_seq_len=64, tokens_per_event=1)
    events = [(i % 50, i % 5, 10 * i) for i in range(58)]  # 2 features + 58 events: 4 candidates per window
    bodies = [request("carol", list(range(10)), 600, events), request("carol", [3, 4], 700, [(1, 1, 650)])]
    limits = RequestLimits(max_candidates=MAX_CANDIDATES)
    with serve() as cached, ScoringServer(uncached, limits=limits) as full, serve(kind="eager") as eager:
        for body in bodies:
            a, b, c = (call(server, "POST", "/score", body) for server in (cached, full, eager))
            assert a[0] == b[0] == c[0] == 200 and a[1]["history_events"] == b[1]["history_events"]
            assert_scores_close(b[1]["scores"], a[1]["scores"])
            assert_scores_close(c[1]["scores"], a[1]["scores"])
        assert uncached.window_calls == 3 + 1
        assert call(full, "POST", "/score", request("carol", [1], 640))[0] == 400  # before the last event
        assert call(full, "GET", "/health")[1]["backend_stats"]["users"] == 1


def test_bundle_round_trip_and_errors(tmp_path: Path) -> None:
    path = save_bundle(MODEL, tmp_path / "b.pt", model_version="v7", metadata={"dataset": "toy"})
    bundle = load_bundle(path)
    assert bundle.model_version == "v7" and bundle.metadata == {"dataset": "toy"} and not bundle.model.training
    assert bundle.model.config == MODEL.config
    for k, v in MODEL.state_dict().items():
        assert torch.equal(bundle.model.state_dict()[k], v)
    backend = backend_from_bundle(path, cache_bytes=1 << 20)
    assert backend.model_version == "v7" and backend.features == SPEC
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(BundleError, match="not a gr-models-ranking-bundle"):
        load_bundle(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(BundleError, match="is not a model bundle"):
        load_bundle(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        load_bundle(tmp_path / "missing.pt")


def test_gr_serve_cli_serves_a_bundle(tmp_path: Path) -> None:
    path = save_bundle(MODEL, tmp_path / "b.pt", model_version="cli-v1")
    cmd = [sys.executable, "-m", "gr_models.serving.cli", "--bundle", str(path), "--port", "0", "--cache-mb", "4"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        port = None
        while port is None:
            line = lines.get(timeout=120)  # the child imports torch: seconds on a busy machine, never minutes
            match = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
            port = int(match.group(1)) if match else None
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/health")
        health = json.loads(conn.getresponse().read())
        conn.close()
        assert health["model_version"] == "cli-v1" and health["backend"] == "cached"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
