"""Multi-seed / multi-variant sweep of the retrieval trainer: mean and spread instead of one lucky (or unlucky) seed.

Each (variant, seed) is one ``python -m examples.retrieval`` process; ``--jobs`` of them run at once (each with
``--threads`` torch threads), so a many-core box or one GPU shared by several small runs gets through a grid fast.
Writes one JSON with every run's validation/test metrics and a per-variant summary (mean, std, min, max), and prints
a markdown table.

    python tools/sweep_retrieval.py --config examples/configs/ml-100k.toml \\
        --set data.data_dir=../shared/data/ml-100k --seeds 1 2 3 \\
        --variant base= --variant alpha1=model.hstu.alpha=1.0 --jobs 2 --out runs/sweep/sweep.json

A variant is ``NAME=OVERRIDE[;OVERRIDE...]`` (``NAME=`` for the config as is).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUMMARY_METRICS = ("ndcg@10", "hr@10", "ndcg@50", "hr@50", "mrr")


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"variant {text!r} is not NAME=OVERRIDE[;OVERRIDE...] (use NAME= for none)")
    return name, [o for o in rest.split(";") if o]


def run_one(
    name: str,
    overrides: list[str],
    seed: int,
    *,
    config: str | None,
    shared: list[str],
    runs_dir: str | Path,
    threads: int,
) -> dict:
    """Trains one (variant, seed) in a subprocess; returns its metrics record (or an ``error`` record)."""
    out_dir = Path(runs_dir) / name / f"seed{seed}"
    cmd = [sys.executable, "-m", "examples.retrieval", "--quiet", "--output-dir", str(out_dir)]
    if config:
        cmd += ["--config", config]
    for o in [*shared, *overrides, f"train.seed={seed}", f"train.num_threads={threads}"]:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    record = {"variant": name, "seed": seed, "overrides": overrides, "wall_s": round(time.time() - t0, 1)}
    if proc.returncode != 0:
        record["error"] = proc.stderr[-2000:]
        print(f"[{name} seed {seed}] FAILED:\n{record['error']}", file=sys.stderr)
        return record
    res = json.loads((out_dir / "results.json").read_text())
    record.update({k: res[k] for k in ("val", "test", "best_epoch", "epochs", "device")})
    record["train_wall_s"] = res["wall_s"]
    record["train_sequences_per_s"] = res["train_sequences_per_s"]
    record["train_tokens_per_s"] = res["train_tokens_per_s"]
    print(
        f"[{name} seed {seed}] best epoch {res['best_epoch']}/{res['epochs']} "
        f"val ndcg@10 {res['val']['ndcg@10']:.4f} test ndcg@10 {res['test']['ndcg@10']:.4f} "
        f"hr@10 {res['test']['hr@10']:.4f} ({record['wall_s']}s)",
        flush=True,
    )
    return record


def summarize(records: list[dict]) -> dict[str, dict]:
    summary: dict[str, dict] = {}
    for name in dict.fromkeys(r["variant"] for r in records):
        ok = [r for r in records if r["variant"] == name and "test" in r]
        entry: dict = {"runs": len(ok), "failed": sum(1 for r in records if r["variant"] == name and "error" in r)}
        for split in ("val", "test"):
            for m in SUMMARY_METRICS:
                vals = [r[split][m] for r in ok]
                if vals:
                    entry[f"{split}/{m}"] = {
                        "mean": statistics.fmean(vals),
                        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                        "min": min(vals),
                        "max": max(vals),
                    }
        entry["best_epoch_mean"] = statistics.fmean(r["best_epoch"] for r in ok) if ok else None
        summary[name] = entry
    return summary


def markdown(summary: dict[str, dict]) -> str:
    cols = ["val/ndcg@10", "test/ndcg@10", "test/hr@10", "test/ndcg@50", "test/mrr"]
    lines = [
        "| variant | runs | " + " | ".join(cols) + " | best epoch (mean) |",
        "|---|---|" + "---|" * (len(cols) + 1),
    ]
    for name, e in summary.items():
        cells = [
            f"{e[c]['mean']:.4f} ± {e[c]['std']:.4f} [{e[c]['min']:.4f}, {e[c]['max']:.4f}]" if c in e else "-"
            for c in cols
        ]
        best = f"{e['best_epoch_mean']:.0f}" if e["best_epoch_mean"] is not None else "-"
        lines.append(f"| {name} | {e['runs']} | " + " | ".join(cells) + f" | {best} |")
    return "\n".join(lines)


def run_grid(
    variants: list[tuple[str, list[str]]],
    seeds: list[int],
    *,
    config: str | None,
    shared: list[str],
    runs_dir: str | Path,
    jobs: int,
    threads: int,
    out: Path,
) -> dict:
    """Runs every (variant, seed), ``jobs`` at a time; rewrites ``out`` (JSON) after each finished run."""
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    records: list[dict] = []
    payload: dict = {}

    def write() -> None:  # after every finished run, so an interrupted sweep still leaves its results
        payload.update(command=" ".join(sys.argv), wall_s=round(time.time() - t0, 1), summary=summarize(records))
        payload["runs"] = records
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(out)

    kwargs = {"config": config, "shared": shared, "runs_dir": runs_dir, "threads": threads}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [
            pool.submit(run_one, name, overrides, seed, **kwargs)
            for (name, overrides), seed in itertools.product(variants, seeds)
        ]
        for fut in as_completed(futures):
            records.append(fut.result())
            write()
    return payload


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="TOML config of the retrieval trainer")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override shared by every run")
    ap.add_argument("--variant", dest="variants", action="append", type=parse_variant, default=[])
    ap.add_argument("--seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--jobs", type=int, default=1, help="runs at once")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--runs-dir", default=str(REPO / "runs" / "sweep"))
    ap.add_argument("--out", default=None, help="JSON summary path (default: <runs-dir>/sweep.json)")
    args = ap.parse_args()
    variants = args.variants or [("base", [])]
    if len({n for n, _ in variants}) != len(variants):
        ap.error("variant names must be unique")
    payload = run_grid(
        variants,
        args.seeds,
        config=args.config,
        shared=args.overrides,
        runs_dir=args.runs_dir,
        jobs=args.jobs,
        threads=args.threads,
        out=Path(args.out or Path(args.runs_dir) / "sweep.json"),
    )
    records, summary = payload["runs"], payload["summary"]
    print(markdown(summary))
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
