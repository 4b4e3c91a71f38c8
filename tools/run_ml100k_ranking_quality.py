"""Quality bar of HSTU ranking on MovieLens-100K: HSTU vs the DLRM-style baseline, same trainer, same split.

python tools/run_ml100k_ranking_quality.py --data-dir ../shared/data/ml-100k [--seeds 1 2 3] [--threads 1]
python tools/run_ml100k_ranking_quality.py --render-only      # rewrite the .md from the .json

Runs examples/configs/ranking-ml-100k.toml once per model and seed (one process, one after the other), writes
docs/results/ml-100k-ranking.json (per-seed test AUC / NE / GAUC / accuracy of the "like" task, MSE of the rating
task, epochs, wall time) and docs/results/ml-100k-ranking.md. Bar: the mean HSTU test AUC exceeds the mean DLRM
test AUC by more than two standard deviations (sample std over seeds, the larger of the two models').
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples/configs/ranking-ml-100k.toml"
OUT_JSON = ROOT / "docs/results/ml-100k-ranking.json"
OUT_MD = ROOT / "docs/results/ml-100k-ranking.md"
METRICS = {"auc": "like/auc", "ne": "like/ne", "gauc": "like/gauc", "accuracy": "like/accuracy", "mse": "rating/mse"}
# Per-model loop lengths: the DLRM baseline is ~10x cheaper per epoch and converges more slowly.
MODEL_OVERRIDES = {"hstu": ["model.type=hstu"], "dlrm": ["model.type=dlrm", "train.epochs=40"]}


def run_one(model: str, seed: int, data_dir: str, threads: int, runs_dir: Path, extra: list[str]) -> dict[str, Any]:
    from examples.common.config import load_config
    from examples.ranking.config import RankingExperimentConfig
    from examples.ranking.trainer import RankingTrainer

    overrides = [
        f"data.data_dir={json.dumps(data_dir)}",
        "data.download=false",
        f"train.seed={seed}",
        f"train.num_threads={threads}",
        f"output.dir={json.dumps(str(runs_dir / f'{model}-seed{seed}'))}",
        "output.tensorboard=false",
        "output.progress=false",
        *MODEL_OVERRIDES[model],
        *extra,
    ]
    config = load_config(RankingExperimentConfig, CONFIG, overrides)
    t0 = time.perf_counter()
    results = RankingTrainer(config).fit()
    results["total_wall_s"] = round(time.perf_counter() - t0, 1)
    return results


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def aggregate(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model, results in runs.items():
        out[model] = {
            "test": {k: [r["test"][m] for r in results] for k, m in METRICS.items()},
            "valid": {k: [r["val"][m] for r in results] for k, m in METRICS.items()},
            "best_epoch": [r["best_epoch"] for r in results],
            "epochs": [r["epochs"] for r in results],
            "train_wall_s": [r["wall_s"] for r in results],
            "total_wall_s": [r["total_wall_s"] for r in results],
            "windows": results[0]["windows"],
        }
        out[model]["test_summary"] = {k: summarize(v) for k, v in out[model]["test"].items()}
    h, d = out["hstu"]["test_summary"]["auc"], out["dlrm"]["test_summary"]["auc"]
    margin = h["mean"] - d["mean"]
    two_std = 2 * max(h["std"], d["std"])
    out["bar"] = {
        "rule": "mean HSTU test AUC - mean DLRM test AUC > 2 x max(sample std of either over seeds)",
        "auc_margin": margin,
        "two_std": two_std,
        "met": bool(margin > two_std),
    }
    return out


def render(payload: dict[str, Any]) -> str:
    lines = [
        "# MovieLens-100K ranking: HSTU vs a DLRM-style baseline",
        "",
        f"Command: `{payload['command']}`  ",
        f"Machine: {payload['machine']}; torch {payload['torch']}; {payload['threads']} thread(s); "
        f"seeds {payload['seeds']}.",
        "",
        "Task: per user, the last 10 ratings are the test candidates, the 10 before them the validation candidates,",
        "earlier windows of 10 the training candidates (each with all earlier events, up to 100, as history).",
        "Labels: like = rating >= 4 (BCE, weight 1) and the rating (MSE, weight 0.1). Both models read the same",
        "user features (id, gender, age group, occupation, zip region) and candidate features (item id, genres);",
        "HSTU also reads the history with the ratings as actions. Checkpoint chosen on validation like-AUC.",
        "",
        "| model | test AUC | test NE | test GAUC | test accuracy | rating MSE | epochs (best) | train wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model in ("hstu", "dlrm"):
        r = payload[model]
        s = r["test_summary"]

        def cell(k: str, s: dict[str, Any] = s) -> str:
            return f"{s[k]['mean']:.4f} ± {s[k]['std']:.4f}"

        epochs = ", ".join(f"{e} ({b})" for e, b in zip(r["epochs"], r["best_epoch"], strict=True))
        wall = statistics.fmean(r["train_wall_s"])
        lines.append(
            f"| {model.upper()} | {cell('auc')} | {cell('ne')} | {cell('gauc')} | {cell('accuracy')} | "
            f"{cell('mse')} | {epochs} | {wall:.0f} |"
        )
    bar = payload["bar"]
    lines += [
        "",
        "Mean ± sample std over seeds. Per-seed test AUC: "
        + "; ".join(
            f"{m.upper()} " + ", ".join(f"{v:.4f}" for v in payload[m]["test"]["auc"]) for m in ("hstu", "dlrm")
        ),
        "",
        f"**Bar ({bar['rule']}): {'met' if bar['met'] else 'NOT met'}** — margin {bar['auc_margin']:.4f} vs "
        f"2 std {bar['two_std']:.4f}.",
    ]
    if payload.get("notes"):
        lines += ["", *payload["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/ml-100k"))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs-dir", default=str(ROOT / "runs/ml100k-ranking-quality"))
    p.add_argument("--models", nargs="+", default=["hstu", "dlrm"], choices=["hstu", "dlrm"])
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra config override for both models")
    p.add_argument("--render-only", action="store_true", help="rewrite the .md from the existing .json")
    args = p.parse_args(argv)
    if args.render_only:
        OUT_MD.write_text(render(json.loads(OUT_JSON.read_text())))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    sys.path.insert(0, str(ROOT))
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in ("hstu", "dlrm")}
    partial = OUT_JSON.with_suffix(".partial.json")
    for seed in args.seeds:
        for model in args.models:
            results = run_one(model, seed, args.data_dir, args.threads, Path(args.runs_dir), args.extra)
            runs[model].append(results)
            logging.info("%s seed %d: test %s", model, seed, results["test"])
            partial.write_text(json.dumps({m: [r["test"] for r in v] for m, v in runs.items()}, indent=2))
    payload = {
        "command": "python tools/run_ml100k_ranking_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared with other jobs)",
        "torch": torch.__version__,
        "threads": args.threads,
        "seeds": args.seeds,
        "config": str(CONFIG.relative_to(ROOT)),
        "model_overrides": MODEL_OVERRIDES,
        "extra_overrides": args.extra,
        **aggregate(runs),
    }
    OUT_JSON.write_text(json.dumps(payload, indent=2) + "\n")
    OUT_MD.write_text(render(payload))
    partial.unlink(missing_ok=True)
    print(render(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
