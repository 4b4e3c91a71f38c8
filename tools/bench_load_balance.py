"""Data-parallel load imbalance of jagged batches: the length-blind split vs gr-parallel's balanced partition.

A step of synchronous data parallelism lasts as long as its slowest rank. With a per-sequence cost of
``L**2 + c * L`` (attention, plus the dense layers for ``c > 0``; see ``gr_parallel.load_balance``), the imbalance
of one global batch is ``max / mean`` of the per-rank costs (1.0 = perfect). For each length distribution, cost
model, DP world size and per-rank batch size, ``--batches`` global batches of ``world_size * batch_size`` i.i.d.
lengths are drawn and split three ways: ``naive`` (contiguous chunks of the shuffled batch, what a
DistributedSampler-style split does), ``greedy`` (count-capped longest-first only) and ``balanced``
(``balanced_partition``: greedy plus pairwise-exchange refinement). Reported: the mean imbalance of each, the mean of
``max_cost_lower_bound / mean`` (no count-balanced split does better), ``step gain`` = mean naive max / mean balanced
max (the attention-bound step-time speed-up if a rank's time is proportional to its cost) and the time of one
``balanced_partition`` call (each rank makes it once per step, on the host).

Distributions, lengths in [1, ``--max-len``]: ``uniform``; ``power-law`` (density proportional to ``L**-1.5``);
``ml-100k`` (drawn from the real per-user interaction counts of MovieLens-100K, ``--ml100k``; skipped with a message
when the file is absent). Cost models: ``attention`` (``c = 0``) and ``hstu-d512`` (``c = hstu_linear_coef(512)``).

Writes ``docs/benchmarks/load_balance.{json,md,png}`` (``--out`` prefix) and prints the table.

    python tools/bench_load_balance.py                      # world sizes 2/4/8, batch sizes 32/128, 100 batches
    python tools/bench_load_balance.py --batches 20 --world-sizes 8 --batch-sizes 512
    python tools/bench_load_balance.py --replot             # rewrite the .md/.png from the .json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling tools modules
from bench_outputs import merge_device_run, saved_runs, write_outputs

from gr_parallel import (
    balanced_partition,
    contiguous_partition,
    hstu_linear_coef,
    max_cost_lower_bound,
    partition_costs,
)

REPO = Path(__file__).resolve().parents[1]
ML100K = REPO.parent / "shared" / "data" / "ml-100k" / "u.data"
POWER_LAW_EXPONENT = 1.5
COST_MODELS = {"attention": 0.0, "hstu-d512": hstu_linear_coef(512)}


def power_law(rng: np.random.Generator, n: int, max_len: int) -> np.ndarray:
    """Inverse CDF of the density proportional to L**-POWER_LAW_EXPONENT on [1, max_len], floored."""
    a = 1 - POWER_LAW_EXPONENT
    return np.floor((1 - rng.random(n) * (1 - max_len**a)) ** (1 / a)).astype(np.int64)


def ml100k_lengths(path: Path) -> np.ndarray | None:
    """Per-user interaction counts of MovieLens-100K's u.data (user, item, rating, timestamp; tab-separated)."""
    if not path.is_file():
        return None
    users = np.loadtxt(path, dtype=np.int64, usecols=0)
    return np.unique(users, return_counts=True)[1]


def samplers(args: argparse.Namespace) -> dict:
    out = {
        "uniform": lambda rng, n: rng.integers(1, args.max_len + 1, n),
        "power-law": lambda rng, n: power_law(rng, n, args.max_len),
    }
    real = ml100k_lengths(Path(args.ml100k))
    if real is None:
        print(f"ml-100k skipped: {args.ml100k} not found", file=sys.stderr)
    else:
        real = np.minimum(real, args.max_len)
        out["ml-100k"] = lambda rng, n: rng.choice(real, n)
    return out


def imbalance(lengths: np.ndarray, parts: list[list[int]], coef: float) -> tuple[float, float]:
    costs = partition_costs(lengths, parts, coef)
    return float(costs.max()), float(costs.max() / costs.mean())


def bench(args: argparse.Namespace) -> list[dict]:
    records = []
    for dist, draw in samplers(args).items():
        for model in args.cost_models:
            coef = COST_MODELS[model]
            for world_size in args.world_sizes:
                for batch_size in args.batch_sizes:
                    rng = np.random.default_rng([args.seed, world_size, batch_size])
                    n = world_size * batch_size
                    acc = {k: [] for k in ("naive", "greedy", "balanced", "naive_max", "balanced_max", "bound")}
                    seconds = 0.0
                    for _ in range(args.batches):
                        lengths = draw(rng, n)
                        mean = (lengths.astype(np.float64) ** 2 + coef * lengths).sum() / world_size
                        t0 = time.perf_counter()
                        parts = balanced_partition(lengths, world_size, linear_coef=coef)
                        seconds += time.perf_counter() - t0
                        top, ratio = imbalance(lengths, parts, coef)
                        acc["balanced"].append(ratio)
                        acc["balanced_max"].append(top)
                        top, ratio = imbalance(lengths, contiguous_partition(n, world_size), coef)
                        acc["naive"].append(ratio)
                        acc["naive_max"].append(top)
                        greedy = balanced_partition(lengths, world_size, linear_coef=coef, refine=False)
                        acc["greedy"].append(imbalance(lengths, greedy, coef)[1])
                        acc["bound"].append(max_cost_lower_bound(lengths, world_size, coef) / mean)
                    rec = dict(
                        device="cpu", distribution=dist, cost_model=model, linear_coef=coef, world_size=world_size,
                        batch_size=batch_size, batches=args.batches,
                        naive=round(float(np.mean(acc["naive"])), 4), greedy=round(float(np.mean(acc["greedy"])), 4),
                        balanced=round(float(np.mean(acc["balanced"])), 4),
                        balanced_worst=round(float(np.max(acc["balanced"])), 4),
                        lower_bound=round(float(np.mean(acc["bound"])), 4),
                        step_gain=round(float(np.mean(acc["naive_max"]) / np.mean(acc["balanced_max"])), 4),
                        ms_per_batch=round(seconds / args.batches * 1e3, 3),
                    )  # fmt: skip
                    records.append(rec)
                    print(
                        f"{dist:9s} {model:9s} W={world_size} B={batch_size:4d}: naive {rec['naive']:.3f} greedy "
                        f"{rec['greedy']:.3f} balanced {rec['balanced']:.3f} (bound {rec['lower_bound']:.3f}) "
                        f"{rec['ms_per_batch']:.2f} ms",
                        flush=True,
                    )
    return records


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128], help="sequences per rank")
    ap.add_argument("--batches", type=int, default=100, help="global batches per configuration")
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--cost-models", nargs="+", choices=sorted(COST_MODELS), default=list(COST_MODELS))
    ap.add_argument("--ml100k", default=str(ML100K), help="MovieLens-100K u.data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replot", action="store_true", help="only rewrite the .md/.png from the .json")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "load_balance"))
    args = ap.parse_args()
    out = Path(args.out)
    if args.replot:
        write_outputs(out, *saved_runs(out), markdown, plot)
        return 0
    for name in ("world_sizes", "batch_sizes"):
        if min(getattr(args, name)) < 1:
            ap.error(f"--{name.replace('_', '-')} must all be >= 1")
    if args.batches < 1 or args.max_len < 1:
        ap.error("--batches and --max-len must be >= 1")
    meta = {
        "device": "cpu",
        "command": "python tools/bench_load_balance.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "cost": "L^2 + c*L per sequence; c = 0 (attention) or hstu_linear_coef(512) = 2560 (HSTU layer, d=512)",
        "power_law_exponent": POWER_LAW_EXPONENT,
        "max_len": args.max_len,
    }
    write_outputs(out, *merge_device_run(out, meta, bench(args)), markdown, plot)
    return 0


def markdown(runs: list[dict], records: list[dict]) -> str:
    lines = ["# Data-parallel load balance of jagged batches (per-rank cost max / mean; 1.0 = perfect)", ""]
    for meta in runs:
        lines.append(
            f"- `{meta['command']}`; {meta['machine']}; torch {meta['torch']}, NumPy {meta['numpy']}, Python "
            f"{meta['python']}; {meta['date']}. Cost: {meta['cost']}. Lengths in [1, {meta['max_len']}]; power-law "
            f"density ~ L^-{meta['power_law_exponent']}; ml-100k draws from the real per-user interaction counts."
        )
    lines += [
        "",
        "| lengths | cost | DP ranks | batch/rank | naive | greedy | balanced | balanced worst | lower bound "
        "| step gain | ms / batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['distribution']} | {r['cost_model']} | {r['world_size']} | {r['batch_size']} | {r['naive']:.3f} | "
            f"{r['greedy']:.3f} | {r['balanced']:.3f} | {r['balanced_worst']:.3f} | {r['lower_bound']:.3f} | "
            f"{r['step_gain']:.2f}x | {r['ms_per_batch']:.2f} |"
        )
    lines += [
        "",
        "Columns: mean over the batches of max/mean per-rank cost for the contiguous split of the shuffled batch "
        "(`naive`), count-capped longest-first (`greedy`) and `balanced_partition` (greedy + exchanges); `balanced "
        "worst`: its largest over the batches; `lower bound`: mean of `max_cost_lower_bound`/mean (no split with equal "
        "counts does better); `step gain`: mean naive max / mean balanced max; `ms / batch`: one "
        "`balanced_partition` call on the host.",
    ]
    if records:
        gap = max(r["balanced"] / r["lower_bound"] - 1 for r in records)
        worst = max(records, key=lambda r: r["balanced"])
        lines += [
            "",
            f"`balanced` is within {100 * gap:.2f}% of the lower bound in every row (mean over batches), so the "
            f"partition is at or next to the best that equal per-rank counts allow. Where it stays above 1 (worst: "
            f"{worst['balanced']:.3f}, {worst['distribution']}, {worst['cost_model']}, {worst['world_size']} ranks x "
            f"{worst['batch_size']}) the bound is set by single sequences costlier than a rank's mean share: only "
            "unequal counts (token-budget batches) or splitting long sequences across ranks (context parallelism) "
            "would lower it.",
        ]
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["cost_model"] for r in records))
    dists = list(dict.fromkeys(r["distribution"] for r in records))
    fig, axes = plt.subplots(
        len(models), len(dists), figsize=(4.5 * len(dists), 3.6 * len(models)), squeeze=False, sharex=True
    )
    for row, model in enumerate(models):
        for col, dist in enumerate(dists):
            ax = axes[row][col]
            sel = [r for r in records if r["cost_model"] == model and r["distribution"] == dist]
            for batch_size in sorted({r["batch_size"] for r in sel}):
                pts = sorted((r["world_size"], r["naive"], r["balanced"]) for r in sel if r["batch_size"] == batch_size)
                ws, naive, balanced = zip(*pts, strict=True)
                ax.plot(ws, naive, "--o", label=f"naive, {batch_size}/rank")
                ax.plot(ws, balanced, "-s", label=f"balanced, {batch_size}/rank")
            ax.set_xscale("log", base=2)
            sizes = sorted({r["world_size"] for r in sel})
            ax.set_xticks(sizes, [str(w) for w in sizes])
            ax.set_title(f"{dist}, {model}")
            ax.set_xlabel("DP ranks")
            ax.set_ylabel("max / mean rank cost")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
