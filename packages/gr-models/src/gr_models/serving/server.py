"""HTTP/JSON front of ``gr-serve`` on the standard library's ``ThreadingHTTPServer``.

Routes:

- ``GET /health``: ``{"status": "ok", "backend", "model_version", "tasks", "limits", "batcher": {...}, "users",
  "backend_stats": {...}}``; ``users``: users whose history the backend keeps (the cached backend's stats also hold
  the K/V cache's hits/misses/evictions/bytes).
- ``POST /score``: the request of ``gr_models.serving.schema``; answers ``{"user_id", "model_version", "tasks",
  "scores": [{task: value}, ...] (one object per candidate, in request order; binary tasks as probabilities,
  regression tasks as predicted values), "history_events", "user_features_defaulted"}``.

Errors are JSON ``{"error": message, "status": code}``: 400 malformed JSON or fields (the message names the field),
404 unknown route, 405 wrong method, 411 no Content-Length, 413 body too large, 415 not JSON, 503 overloaded or
timed out, 500 anything unexpected: logged with its traceback server-side, never sent to the client.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from gr_models.inference.requests import InferenceInputError
from gr_models.serving.backends import ScoreResult, ScoringBackend
from gr_models.serving.batcher import DynamicBatcher
from gr_models.serving.schema import RequestError, RequestLimits, ScoreRequest, parse_score_request

logger = logging.getLogger(__name__)


class ScoringServer:
    """Serves a backend on ``host:port`` (port 0: an ephemeral port, read ``.port`` after ``start()``)."""

    def __init__(
        self,
        backend: ScoringBackend,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: RequestLimits | None = None,
        max_batch: int = 32,
        batch_window_ms: float = 2.0,
        max_queue: int = 1024,
        request_timeout_s: float = 30.0,
        max_body_bytes: int = 8 << 20,
    ) -> None:
        self.backend = backend
        self.limits = limits or RequestLimits()
        self.batcher = DynamicBatcher(backend, max_batch=max_batch, window_s=batch_window_ms / 1e3, max_queue=max_queue)
        self.request_timeout_s = request_timeout_s
        self.max_body_bytes = max_body_bytes
        self.httpd = ThreadingHTTPServer((host, port), _handler_class(self))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return str(self.httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ScoringServer:
        """Starts the batcher and serves in a background thread."""
        self.batcher.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="gr-serve-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serves in the calling thread until interrupted."""
        self.batcher.start()
        try:
            self.httpd.serve_forever()
        finally:
            self.httpd.server_close()
            self.batcher.stop()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.batcher.stop()

    def __enter__(self) -> ScoringServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- route bodies ----------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        backend_stats = self.backend.stats()
        return {
            "status": "ok",
            "backend": self.backend.name,
            "model_version": self.backend.model_version,
            "tasks": [{"name": t.name, "kind": t.kind} for t in self.backend.tasks],
            "limits": self.limits.__dict__,
            "batcher": self.batcher.stats.as_dict(),
            "users": backend_stats.get("users"),  # users whose history the backend keeps
            "backend_stats": backend_stats,
        }

    def score(self, body: Any) -> dict[str, Any]:
        try:
            request = parse_score_request(body, self.backend.features, self.limits)
        except InferenceInputError as exc:  # the typed request containers' own checks
            raise RequestError(400, str(exc)) from None
        future = self.batcher.submit(request)
        try:
            result = future.result(timeout=self.request_timeout_s)
        except FutureTimeout:
            raise RequestError(503, f"scoring took longer than {self.request_timeout_s}s") from None
        except InferenceInputError as exc:
            raise RequestError(400, str(exc)) from None
        return self._response(request, result)

    def _response(self, request: ScoreRequest, result: ScoreResult) -> dict[str, Any]:
        scores = result.scores
        binary = torch.tensor([t.kind == "binary" for t in self.backend.tasks])
        values = torch.where(binary, torch.sigmoid(scores), scores).tolist()
        names = [t.name for t in self.backend.tasks]
        return {
            "user_id": request.user_id,
            "model_version": self.backend.model_version,
            "tasks": names,
            "scores": [dict(zip(names, row, strict=True)) for row in values],
            "history_events": result.history_events,
            "user_features_defaulted": result.user_features_defaulted,
        }


def _handler_class(app: ScoringServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "gr-serve"
        protocol_version = "HTTP/1.1"  # keep-alive: the load test reuses connections
        # Headers and body go out in two writes: with Nagle on, the body waits for the client's delayed ACK (~40 ms).
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("%s %s", self.address_string(), format % args)

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"error": message, "status": status})

        def _guard(self, route: Any) -> None:
            try:
                self._send(200, route())
            except RequestError as exc:
                self._error(exc.status, exc.message)
            except Exception:
                incident = uuid.uuid4().hex[:12]
                logger.exception("internal error %s on %s %s", incident, self.command, self.path)
                self._error(500, f"internal error (incident {incident}); see the server log")

        def do_GET(self) -> None:
            if self.path == "/health":
                self._guard(app.health)
            elif self.path == "/score":
                self._error(405, "use POST /score")
            else:
                self._error(404, f"no route GET {self.path}; routes: GET /health, POST /score")

        def do_POST(self) -> None:
            if self.path != "/score":
                if self.path == "/health":
                    self._error(405, "use GET /health")
                else:
                    self._error(404, f"no route POST {self.path}; routes: GET /health, POST /score")
                self._drain()
                return
            self._guard(self._score)

        def _drain(self) -> None:
            """Reads an unread body so the kept-alive connection stays in sync (bounded by max_body_bytes)."""
            length = self.headers.get("Content-Length")
            if length and length.isdigit() and int(length) <= app.max_body_bytes:
                self.rfile.read(int(length))
            else:
                self.close_connection = True

        def _score(self) -> dict[str, Any]:
            length = self.headers.get("Content-Length")
            if length is None:
                self.close_connection = True
                raise RequestError(411, "POST /score needs a Content-Length header")
            if not length.isdigit():
                self.close_connection = True
                raise RequestError(400, f"bad Content-Length {length!r}")
            if int(length) > app.max_body_bytes:
                self.close_connection = True
                raise RequestError(413, f"body of {length} bytes > limit {app.max_body_bytes}")
            raw = self.rfile.read(int(length))
            ctype = self.headers.get("Content-Type", "application/json").split(";")[0].strip().lower()
            if ctype != "application/json":
                raise RequestError(415, f"Content-Type must be application/json, got {ctype!r}")
            try:
                body = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise RequestError(400, f"body is not valid JSON: {exc}") from None
            return app.score(body)

    return Handler
