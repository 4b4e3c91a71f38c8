"""CLI of the ranking trainer.

python -m examples.ranking --config examples/configs/ranking-synthetic.toml
python -m examples.ranking --config examples/configs/ranking-ml-100k.toml --set data.data_dir=../shared/data/ml-100k
python -m examples.ranking --config ... --set model.type=dlrm          # the DLRM-style baseline, same split
python -m examples.ranking --config ... --output-dir runs/x --resume
torchrun --standalone --nproc-per-node 2 -m examples.ranking --config examples/configs/ranking-synthetic.toml  # DP=2
"""

from __future__ import annotations

import sys
from typing import Any

from examples.common.cli import run_cli
from examples.ranking.config import RankingExperimentConfig


def _train(config: RankingExperimentConfig, resume: bool) -> dict[str, Any]:
    from examples.ranking.trainer import RankingTrainer  # heavy imports after argument errors

    return RankingTrainer(config, resume=resume).fit()


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        argv,
        prog="python -m examples.ranking",
        doc=__doc__,
        set_example="--set model.type=dlrm --set train.lr=5e-4",
        config_cls=RankingExperimentConfig,
        train=_train,
    )


if __name__ == "__main__":
    sys.exit(main())
