"""Quality bar of the foundation issue: HSTU vs SASRec next-item retrieval on MovieLens-100K.

Trains both encoders with the same trainer, split and recipe (examples/configs/ml-100k.toml), picks the epoch
on validation NDCG@10, and writes docs/results/ml-100k.{json,md}.

    hatch run ml100k-quality -- --data-dir ../shared/data/ml-100k
    python tools/run_ml100k_quality.py --data-dir ../shared/data/ml-100k [--encoders hstu sasrec] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from examples.common.config import load_config  # noqa: E402
from examples.retrieval.config import RetrievalExperimentConfig  # noqa: E402
from examples.retrieval.trainer import RetrievalTrainer  # noqa: E402

# What the issue asks for: test NDCG@10 >= 0.095 and HR@10 >= 0.185 for HSTU.
TARGETS = {"ndcg@10": 0.095, "hr@10": 0.185}
METRICS = ["hr@1", "hr@10", "hr@50", "hr@200", "ndcg@10", "ndcg@50", "ndcg@200", "mrr"]


def machine() -> dict[str, object]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def markdown(results: dict, command: str) -> str:
    lines = [
        "# MovieLens-100K next-item retrieval: HSTU vs SASRec",
        "",
        f"Command: `{command}`  ",
        f"Machine: {results['machine']['processor']}, {results['machine']['cpu_count']} cores, "
        f"torch {results['machine']['torch']}, device {results['hstu']['device'] if 'hstu' in results else '-'}.  ",
        "Protocol: leave-one-out (last item test, second-to-last validation), full ranking over all 1682 items with the"
        " user's history removed; epoch chosen on validation NDCG@10. Recipe: examples/configs/ml-100k.toml (2 blocks,"
        " 1 head, dim 50, max length 200, dropout 0.2, 128 uniform negatives, temperature 0.05, lr 1e-3, batch 128).",
        "",
        "| encoder | split | " + " | ".join(METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for enc in ("hstu", "sasrec"):
        if enc not in results:
            continue
        for split in ("test", "val"):
            vals = " | ".join(f"{results[enc][split][m]:.4f}" for m in METRICS)
            lines.append(f"| {enc} | {split} | {vals} |")
    lines += ["", "| encoder | best epoch | epochs trained | train wall (s) | train sequences/s | train tokens/s |"]
    lines.append("|---|---|---|---|---|---|")
    for enc in ("hstu", "sasrec"):
        if enc in results:
            r = results[enc]
            lines.append(
                f"| {enc} | {r['best_epoch']} | {r['epochs']} | {r['wall_s']} | {r['train_sequences_per_s']} | "
                f"{r['train_tokens_per_s']} |"
            )
    if "hstu" in results and "sasrec" in results:
        h, b = results["hstu"]["test"]["ndcg@10"], results["sasrec"]["test"]["ndcg@10"]
        lines += [
            "",
            f"HSTU vs SASRec, test NDCG@10: {h:.4f} vs {b:.4f} ({100 * (h - b) / b:+.1f}% for HSTU), one seed each.",
        ]
    for note in results.get("notes", []):  # observations added by the person who ran it, kept in the JSON
        lines += ["", note]
    if "hstu" in results:
        t = results["hstu"]["test"]
        verdict = all(t[k] >= v for k, v in TARGETS.items())
        lines += [
            "",
            f"Target (HSTU test NDCG@10 >= {TARGETS['ndcg@10']}, HR@10 >= {TARGETS['hr@10']}): "
            f"**{'met' if verdict else 'NOT met'}** (NDCG@10 {t['ndcg@10']:.4f}, HR@10 {t['hr@10']:.4f}).",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "ml-100k"))
    ap.add_argument("--config", default=str(REPO / "examples" / "configs" / "ml-100k.toml"))
    ap.add_argument("--encoders", nargs="+", default=["hstu", "sasrec"], choices=["hstu", "sasrec"])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--runs-dir", default=str(REPO / "runs" / "ml100k-quality"))
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "ml-100k"))
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md from the existing .json; no training")
    args = ap.parse_args()
    if args.render_only:
        results = json.loads(Path(args.out).with_suffix(".json").read_text())
        Path(args.out).with_suffix(".md").write_text(markdown(results, results["command"]))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)

    results: dict = {"machine": machine()}
    t0 = time.time()
    for enc in args.encoders:
        overrides = [
            f"data.data_dir={json.dumps(args.data_dir)}",
            "data.download=false",
            f"model.encoder={json.dumps(enc)}",
            f"output.dir={json.dumps(str(Path(args.runs_dir) / enc))}",
            "output.progress=false",
            *args.overrides,
        ]
        cfg = load_config(RetrievalExperimentConfig, args.config, overrides)
        r = RetrievalTrainer(cfg).fit()
        results[enc] = {k: r[k] for k in ("test", "val", "best_epoch", "epochs", "wall_s", "device")}
        results[enc]["train_sequences_per_s"] = r["train_sequences_per_s"]
        results[enc]["train_tokens_per_s"] = r["train_tokens_per_s"]
    results["total_wall_s"] = round(time.time() - t0, 1)
    command = "python tools/run_ml100k_quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results["command"] = command
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results, command))
    print(markdown(results, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
