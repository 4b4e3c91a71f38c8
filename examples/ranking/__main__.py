"""CLI of the ranking trainer.

python -m examples.ranking --config examples/configs/ranking-synthetic.toml
python -m examples.ranking --config examples/configs/ranking-ml-100k.toml --set data.data_dir=../shared/data/ml-100k
python -m examples.ranking --config ... --set model.type=dlrm          # the DLRM-style baseline, same split
python -m examples.ranking --config ... --output-dir runs/x --resume
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from examples.common.config import ConfigError, load_config
from examples.ranking.config import RankingExperimentConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m examples.ranking", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="TOML config (sections data/model/train/output); default: built-in defaults")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.type=dlrm --set train.lr=5e-4 (repeatable)",
    )
    p.add_argument("--output-dir", help="shorthand for --set output.dir=...")
    p.add_argument("--resume", action="store_true", help="continue from <output.dir>/last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output.dir={json.dumps(args.output_dir)}")
    if args.quiet:
        overrides.append("output.progress=false")
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    try:
        config = load_config(RankingExperimentConfig, args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from examples.ranking.trainer import RankingTrainer  # heavy imports after argument errors

    results = RankingTrainer(config, resume=args.resume).fit()
    print(json.dumps({k: results[k] for k in ("test", "best_epoch", "epochs", "wall_s") if k in results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
