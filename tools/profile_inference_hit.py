"""Where a KV-cache hit's latency goes: host time per scorer phase, host time until ``score`` returns, total time
with the device, and (on CUDA) the kernels' summed time and the top kernels under torch.profiler.

One user per history length; after the prefix is cached, each request comes at a new request time (the last history
token is recomputed), as in ``tools/bench_inference.py``'s ``cached`` mode. Phase timers wrap the scorer's methods
without synchronising, so they show host work only; "total" synchronises once per request.

    python tools/profile_inference_hit.py --device cuda              # bf16, dim 512, 8 blocks, 4 heads
    python tools/profile_inference_hit.py --device cpu --dim 16      # host overhead on a CPU (tiny model)
    python tools/profile_inference_hit.py --device cuda --mode full  # the same for bench_inference's ``full`` mode

``--mode full`` profiles ``CachedRankingScorer.full_recompute`` (the uncached forward the cached latency is compared
with) the same way: host time until return, total, kernels.

``--host-breakdown`` (cached mode) splits a hit's host time at the encoder pass: host work before the first graph
replay (on the CPU: before the padded pass's eager encode, which a replay stands in for), the replay calls themselves,
between replays, and after the last one until ``score`` returns, with every host step of the hit timed on its own
(medians over ``--requests`` hits). It runs on a CPU as well (``--device cpu --cuda-graphs on``: the steps are the
same Python that prepares a GPU replay's inputs, on CPU tensors; the eager encode stands in for the replay once per
bucket, then hands back its outputs as a replay does):

    python tools/profile_inference_hit.py --device cpu --dtype fp32 --dim 32 --blocks 2 --heads 2 --histories 4096 \
        --micro-batch 256 --cuda-graphs on --host-breakdown --requests 200
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling tools modules
from bench_inference import DTYPES, build_model, request_data


def on_call_times(fn, record):
    """``fn`` wrapped so that every call hands its host start and end times (``perf_counter``) to ``record``."""

    @functools.wraps(fn)
    def wrapper(*a, **k):
        start = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            record(start, time.perf_counter())

    return wrapper


def timed_into(totals: dict[str, float], name: str, fn, scale: float = 1.0):
    """``fn`` wrapped so that every call adds its host seconds (times ``scale``) to ``totals[name]``."""

    def add(start: float, end: float) -> None:
        totals[name] = totals.get(name, 0.0) + (end - start) * scale

    return on_call_times(fn, add)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cpu or cuda")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--num-items", type=int, default=100_000)
    ap.add_argument("--histories", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--candidates", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=128)
    ap.add_argument("--cache-mb", type=int, default=4096)
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--mode", choices=["cached", "full"], default="cached")
    ap.add_argument(
        "--host-breakdown", action="store_true", help="host time before / between / after the graph replays, per step"
    )
    args = ap.parse_args()
    if args.host_breakdown and args.mode != "cached":
        ap.error("--host-breakdown profiles cache hits (--mode cached)")

    from gr_models.inference import CachedRankingScorer, KVCache
    from gr_models.inference import scorer as scorer_module

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda needs a CUDA GPU", file=sys.stderr)
        return 1
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = build_model(args, 4 + max(args.histories) + args.candidates).to(device)
    cache = KVCache.for_encoder(
        model.config.hstu, budget_bytes=args.cache_mb << 20, page_size=64, device=device, dtype=dtype
    )
    graphs = {"auto": None, "on": True, "off": False}[args.cuda_graphs]
    scorer = CachedRankingScorer(
        model, cache, micro_batch=args.micro_batch, dtype=dtype, max_candidates=args.candidates, cuda_graphs=graphs
    )

    if args.host_breakdown:
        return host_breakdown(args, scorer, scorer_module, sync)

    phase: dict[str, float] = {}

    def timed(name: str, fn):
        return timed_into(phase, name, fn, scale=1e3)

    scorer_module.window_ids = timed("window_ids", scorer_module.window_ids)
    scorer_module.embed_window_ids = timed("embed_window_ids (eager passes)", scorer_module.embed_window_ids)
    for name in ("_update_history", "_plan_prefix", "_pass_pieces", "_encode", "_store_prefix"):
        setattr(scorer, name, timed(name, getattr(scorer, name)))
    if scorer.graphs is not None:
        scorer.graphs.run = timed("graphs.run", scorer.graphs.run)
    scorer.heads.forward = timed("heads", scorer.heads.forward)

    for history in args.histories:
        feats, events, cands, t0 = request_data(history, args.candidates, args.num_items, seed=history)
        user = f"user-{history}"
        clock = itertools.count(1)
        if args.mode == "full":
            request = functools.partial(scorer.full_recompute, feats, events, cands, t0)
        else:
            scorer.score(user, feats, events, cands, t0)  # fills the cache

            def request(user=user, feats=feats, cands=cands, t0=t0, clock=clock):
                return scorer.score(user, feats, None, cands, t0 + next(clock))

        for _ in range(3):
            request()
        sync()
        phase.clear()
        host, total = [], []
        for _ in range(args.requests):
            sync()
            start = time.perf_counter()
            request()
            host.append((time.perf_counter() - start) * 1e3)
            sync()
            total.append((time.perf_counter() - start) * 1e3)
        per_phase = {k: round(v / args.requests, 3) for k, v in phase.items()}
        head = f"{args.mode} history {history} x {args.candidates}"
        print(f"{head}: host until return {min(host):.2f} ms, total {min(total):.2f} ms")
        print(f"  host ms per phase (mean; '_encode' is inside 'graphs.run' when graphs replay): {per_phase}")
        if device.type != "cuda":
            continue
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            request()
            sync()
        averages = prof.key_averages()
        kernels = [e for e in averages if e.device_type.name == "CUDA"]
        busy = sum(e.device_time_total for e in kernels) / 1e3
        print(f"  CUDA kernels: {sum(e.count for e in kernels)} launches, {busy:.3f} ms summed")
        print(averages.table(sort_by="self_cuda_time_total", row_limit=16, max_name_column_width=90))
    return 0


# Host steps of a hit, in call order: (where, attribute). Nested steps are timed inside their callers as well.
HIT_STEPS = (
    ("scorer", "_check_features"),
    ("scorer", "_check_candidates"),
    ("scorer", "_update_history"),
    ("scorer", "_plan_prefix"),
    ("scorer_module", "window_ids"),
    ("scorer", "_run_batched"),
    ("scorer", "_pass_pieces"),
    ("scorer", "_bias_pieces"),
    ("scorer", "_bias_times"),
    ("WindowIds", "pieces"),
    ("graphs", "run"),
    ("PassGraphs", "_fill"),
    ("scorer", "heads.forward"),
    ("scorer", "_store_prefix"),
    ("cache", "reserve"),
    ("cache", "write_rows"),
)


def host_breakdown(args, scorer, scorer_module, sync) -> int:
    """Host ms per hit (median over ``--requests`` hits): before the first replay, in replay calls, between replays,
    after the last, and per step. On a CPU the padded pass's encode function stands in for the replay: run once per
    bucket, then its outputs are handed back as a replay hands back its graph's buffers (so the timings are the
    host's alone; the scores of those hits are stale, which the breakdown does not read)."""
    from gr_models.inference import pass_graphs, window

    if scorer.graphs is None:
        print("--host-breakdown needs CUDA-graph passes (--cuda-graphs on on a CPU)", file=sys.stderr)
        return 1
    steps: dict[str, float] = {}  # this request's host seconds per step
    replays: list[tuple[float, float]] = []  # (start, end) of every replay (CPU: its stand-in) in this request

    def timed(name, fn):
        return timed_into(steps, name, fn)

    def replay_timed(fn):
        return on_call_times(fn, lambda start, end: replays.append((start, end)))

    owners = {"scorer": scorer, "scorer_module": scorer_module, "graphs": scorer.graphs, "cache": scorer.cache}
    owners.update(WindowIds=window.WindowIds, PassGraphs=pass_graphs.PassGraphs)
    for where, attr in HIT_STEPS:
        obj = owners[where]
        *path, name = attr.split(".")
        for part in path:
            obj = getattr(obj, part)
        if not hasattr(obj, name):
            continue  # a step this version of the scorer does not have
        fn = getattr(obj, name)
        if isinstance(obj, type) and isinstance(obj.__dict__.get(name), staticmethod):
            setattr(obj, name, staticmethod(timed(f"{where}.{attr}", fn)))
        else:
            setattr(obj, name, timed(f"{where}.{attr}", fn))
    if args.device == "cuda":
        torch.cuda.CUDAGraph.replay = replay_timed(torch.cuda.CUDAGraph.replay)
    else:
        run, outputs = scorer.graphs.run, {}

        def run_with_stand_in(key, *a):
            *a, encode = a

            def stand_in(*b):
                if key not in outputs:
                    outputs[key] = encode(*b)
                return outputs[key]

            return run(key, *a, replay_timed(stand_in))

        scorer.graphs.run = run_with_stand_in

    for history in args.histories:
        feats, events, cands, t0 = request_data(history, args.candidates, args.num_items, seed=history)
        user = f"user-{history}"
        scorer.score(user, feats, events, cands, t0)  # fills the cache
        clock = itertools.count(1)
        for _ in range(3):
            scorer.score(user, feats, None, cands, t0 + next(clock))
        sync()
        per_hit: dict[str, list[float]] = {}
        for _ in range(args.requests):
            sync()
            replays.clear()
            steps.clear()
            start = time.perf_counter()
            scorer.score(user, feats, None, cands, t0 + next(clock))
            end = time.perf_counter()
            if not replays:
                print("a request ran no padded pass: not a graph-replayed hit", file=sys.stderr)
                return 1
            parts = {
                "until return": end - start,
                "before first replay": replays[0][0] - start,
                "replay calls": sum(b - a for a, b in replays),
                "between replays": sum(b[0] - a[1] for a, b in itertools.pairwise(replays)),
                "after last replay": end - replays[-1][1],
                **steps,
            }
            for name, seconds in parts.items():
                per_hit.setdefault(name, []).append(seconds * 1e3)

        def median(name: str, per_hit: dict[str, list[float]] = per_hit) -> float:
            values = sorted(per_hit[name])
            return values[len(values) // 2]

        n = args.requests
        print(f"host breakdown, history {history} x {args.candidates}, micro-batch {args.micro_batch}, {n} hits "
              f"(median ms per hit; mean until return {sum(per_hit['until return']) / n:.3f}):")  # fmt: skip
        stand_in = "" if args.device == "cuda" else " (CPU: a stand-in handing back buffers)"
        for name in ("until return", "before first replay", "replay calls", "between replays", "after last replay"):
            print(f"  {name + (stand_in if name == 'replay calls' else ''):<60} {median(name):8.3f}")
        print("  steps (nested: _run_batched holds the pass, _pass_pieces _bias_pieces on a new layout or only "
              "_bias_times on a")  # fmt: skip
        print("  reused one, graphs.run the replay and _fill,")
        print("  _store_prefix the cache's reserve and write_rows):")
        for where, attr in HIT_STEPS:
            name = f"{where}.{attr}"
            if name in per_hit:
                print(f"    {name:<58} {median(name):8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
