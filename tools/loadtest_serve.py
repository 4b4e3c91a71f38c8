"""Bounded loopback load test of gr-serve: p50/p99 latency and requests/s of ``POST /score``.

Starts a ``ScoringServer`` in this process on 127.0.0.1 (ephemeral port) for each scenario, then ``--concurrency``
client threads with keep-alive connections send ``--requests`` timed requests in total. Each client owns a
disjoint set of users, so a user's requests stay in time order: every user is first seeded (untimed) with
``--history`` events, then each timed request brings 1-2 new events and ``--candidates`` candidates (the realistic
serving pattern: a cache hit plus an incremental append). Any non-200 answer fails the run.

Scenarios: backend ``cached`` (KV-cached scorer, model with causal context so appends are incremental), ``eager``
(full recompute with the plain model, each batcher group's users in one forward) and ``exported`` (AOTInductor
package, full recompute per request; compiling it takes a minute on a small CPU), each at every concurrency in
``--concurrency``. Records go to ``docs/benchmarks/serving.{json,md}``.

    python tools/loadtest_serve.py                                   # the recorded CPU runs (small model):
    python tools/loadtest_serve.py --append --max-seq-len 1100 --history 1000 --candidates 64 --requests 100 \
        --users 16 --concurrency 1                                   # long histories
    python tools/loadtest_serve.py --backends cached --requests 200  # quicker
    python tools/loadtest_serve.py --bundle runs/ranking-synthetic/model_bundle.pt --backends cached
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from gr_models.inference.export import save_scoring_package
from gr_models.modules.hstu import HSTUConfig
from gr_models.ranking import HSTURankingConfig, HSTURankingModel, RankingFeatureSpec, RankingTask
from gr_models.serving import (
    RequestLimits,
    ScoringServer,
    backend_from_package,
    cached_backend,
    eager_backend,
    load_bundle,
)

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "benchmarks"


def small_model(args: argparse.Namespace) -> HSTURankingModel:
    torch.manual_seed(0)
    spec = RankingFeatureSpec(args.num_items, 5, ("age", "gender"), (7, 2), "genre", 20)
    cfg = HSTURankingConfig(
        spec,
        [RankingTask("like", "binary"), RankingTask("rating", "regression")],
        embedding_dim=args.dim,
        max_seq_len=args.max_seq_len,
        dropout=0.0,
        head_hidden=2 * args.dim,
        context_attention="causal",
        hstu=HSTUConfig(num_blocks=args.blocks, num_heads=args.heads),
    )
    return HSTURankingModel(cfg).eval()


class Client(threading.Thread):
    """Sends its share of timed requests over one keep-alive connection; records each latency."""

    def __init__(self, port: int, users: list[int], n: int, args: argparse.Namespace, start: threading.Barrier):
        super().__init__(daemon=True)
        self.port, self.users, self.n, self.args, self.start_line = port, users, n, args, start
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.gen = torch.Generator().manual_seed(1000 + users[0])
        self.clock = {u: 1_700_000_000 for u in users}

    def _ints(self, hi: int, n: int) -> list[int]:
        return torch.randint(0, hi, (n,), generator=self.gen).tolist()

    def _body(self, user: int, new_events: int) -> bytes:
        a = self.args
        t0 = self.clock[user]
        self.clock[user] = t0 + 60 * (new_events + 1)
        events = {
            "items": self._ints(a.num_items, new_events),
            "actions": self._ints(5, new_events),
            "timestamps": [t0 + 60 * i for i in range(new_events)],
            "bags": [[g] for g in self._ints(20, new_events)],
        }
        return json.dumps(
            {
                "user_id": user,
                "user_features": [user % 7, user % 2],
                "events": events,
                "candidates": {"items": self._ints(a.num_items, a.candidates)},
                "request_time": self.clock[user],
            }
        ).encode()

    def _post(self, conn: http.client.HTTPConnection, body: bytes) -> None:
        conn.request("POST", "/score", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        payload = resp.read()
        if resp.status != 200:
            self.errors.append(f"{resp.status}: {payload[:200]!r}")

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            for user in self.users:  # untimed: the user's history so far
                self._post(conn, self._body(user, self.args.history))
            self.start_line.wait()
            for i in range(self.n):
                body = self._body(self.users[i % len(self.users)], 1 + i % 2)
                t = time.perf_counter()
                self._post(conn, body)
                self.latencies.append(time.perf_counter() - t)
        except Exception as exc:  # reported, fails the run
            self.errors.append(repr(exc))
            self.start_line.abort()
        finally:
            conn.close()


def run_scenario(server: ScoringServer, concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    users_per_client = max(args.users // concurrency, 1)
    share = [args.requests // concurrency + (i < args.requests % concurrency) for i in range(concurrency)]
    start = threading.Barrier(concurrency + 1)
    clients = [
        Client(server.port, list(range(i * users_per_client, (i + 1) * users_per_client)), share[i], args, start)
        for i in range(concurrency)
    ]
    for c in clients:
        c.start()
    start.wait()
    before = dict(server.batcher.stats.as_dict())
    t0 = time.perf_counter()
    for c in clients:
        c.join()
    wall = time.perf_counter() - t0
    errors = [e for c in clients for e in c.errors]
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, first: {errors[0]}")
    lat = sorted(x * 1e3 for c in clients for x in c.latencies)
    after = server.batcher.stats.as_dict()
    batches = after["batches"] - before["batches"]
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return {
        "requests": len(lat),
        "concurrency": concurrency,
        "p50_ms": round(q[49], 3),
        "p90_ms": round(q[89], 3),
        "p99_ms": round(q[98], 3),
        "mean_ms": round(statistics.fmean(lat), 3),
        "requests_per_s": round(len(lat) / wall, 1),
        "mean_batch": round((after["requests"] - before["requests"]) / batches, 2) if batches else 0.0,
        "load_1min_after": round(os.getloadavg()[0], 1),  # other jobs on a shared machine skew the numbers
    }


def write_outputs(run: dict[str, Any], out: Path, append: bool) -> None:
    """``serving.json`` holds a list of runs (``--append`` keeps the earlier ones); ``serving.md`` shows each."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "serving.json"
    runs = json.loads(path.read_text())["runs"] if append and path.is_file() else []
    runs.append(run)
    path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    lines = [
        "# gr-serve load test (loopback)",
        "",
        "`cached`: KV-cached scorer (`gr-serve --bundle`); `eager`: full recompute with the plain model, each group "
        "of concurrent requests in one jagged forward (`gr-serve --bundle --mode eager`); `exported`: AOTInductor "
        "package, full recompute per request (`gr-serve --package`). Latency is client-side: HTTP round trip over "
        "loopback with JSON both ways. The batcher groups concurrent requests (mean batch); `cached` scores a group "
        "with one `CachedRankingScorer.score_many` call (one jagged delta-q pass for the group's appends, one for "
        "all its candidate micro-batches), `eager` in one forward, `exported` one request after another.",
        "",
    ]
    for r in runs:
        lines += [
            f"## history {r['history']} events, {r['candidates']} candidates",
            "",
            f"Command: `{r['command']}`  ",
            f"Machine: {r['machine']}; torch {r['torch']}, {r['torch_threads']} intra-op thread(s) in the server; "
            f"load average at start {r['load_average']} (a shared machine: expect noise).  ",
            f"Model: {r['model']}.  ",
            f"Workload: {r['users']} users, each seeded with {r['history']} events (untimed), then every timed "
            f"request appends 1-2 events and scores {r['candidates']} candidates; a client thread owns its users.",
            "",
            "| backend | concurrency | requests | p50 ms | p90 ms | p99 ms | mean ms | requests/s | mean batch "
            "| load after |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for x in r["records"]:
            lines.append(
                f"| {x['backend']} | {x['concurrency']} | {x['requests']} | {x['p50_ms']} | {x['p90_ms']} | "
                f"{x['p99_ms']} | {x['mean_ms']} | {x['requests_per_s']} | {x['mean_batch']} | "
                f"{x.get('load_1min_after', '')} |"
            )
        lines.append("")
    (out / "serving.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", help="serve this model bundle instead of the built-in small random model")
    p.add_argument("--backends", default="cached,eager,exported")
    p.add_argument("--concurrency", default="1,8", help="comma-separated client thread counts")
    p.add_argument("--requests", type=int, default=400, help="timed requests per scenario")
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--history", type=int, default=150, help="seeded events per user")
    p.add_argument("--candidates", type=int, default=32)
    p.add_argument("--num-items", type=int, default=2000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the server")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--batch-window-ms", type=float, default=2.0)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--append", action="store_true", help="keep the runs already in serving.json")
    args = p.parse_args(argv)
    if args.requests < 1 or args.users < 1:
        p.error("--requests and --users must be >= 1")
    torch.set_num_threads(args.threads)
    model = load_bundle(args.bundle).model if args.bundle else small_model(args)
    cfg = model.config
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    limits = RequestLimits(max_candidates=max(args.candidates, 1), max_events=max(args.history, 2))
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backends.split(","):
            if name == "cached":
                make = functools.partial(cached_backend, model, cache_bytes=256 << 20, max_candidates=args.candidates)
            elif name == "eager":
                make = functools.partial(eager_backend, model)
            elif name == "exported":
                t0 = time.perf_counter()
                package = save_scoring_package(model, Path(tmp) / "scoring.pt2", "loadtest")
                print(f"compiled the AOTInductor package in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
                make = functools.partial(backend_from_package, package)
            else:
                p.error(f"unknown backend {name!r}: cached, eager or exported")
            for concurrency in concurrencies:
                backend = make()  # fresh state per scenario
                opts = {"max_batch": args.max_batch, "batch_window_ms": args.batch_window_ms}
                with ScoringServer(backend, limits=limits, **opts) as server:
                    record = {"backend": name, **run_scenario(server, concurrency, args)}
                print(json.dumps(record), file=sys.stderr)
                records.append(record)
    run = {
        "command": "python tools/loadtest_serve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} CPU(s), {platform.processor() or platform.system()}",
        "load_average": load_at_start,
        "torch": torch.__version__,
        "torch_threads": args.threads,
        "python": platform.python_version(),
        "model": args.bundle
        or f"HSTU ranking, dim {cfg.embedding_dim}, {cfg.hstu.num_blocks} blocks x {cfg.hstu.num_heads} heads, "
        f"max_seq_len {cfg.max_seq_len}, {cfg.features.num_items} items (random weights)",
        "history": args.history,
        "candidates": args.candidates,
        "users": args.users,
        "records": records,
    }
    write_outputs(run, args.out, args.append)
    print((args.out / "serving.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
