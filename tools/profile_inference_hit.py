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
    args = ap.parse_args()

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

    phase: dict[str, float] = {}

    def timed(name: str, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phase[name] = phase.get(name, 0.0) + (time.perf_counter() - start) * 1e3

        return wrapper

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


if __name__ == "__main__":
    raise SystemExit(main())
