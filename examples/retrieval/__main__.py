"""CLI of the retrieval trainer.

python -m examples.retrieval                                   # synthetic data, runs anywhere
python -m examples.retrieval --config examples/configs/ml-100k.toml --set data.data_dir=../shared/data/ml-100k
python -m examples.retrieval --config ... --output-dir runs/x --resume
torchrun --standalone --nproc-per-node 2 -m examples.retrieval --config examples/configs/synthetic-parallel.toml --tp 2
"""

from __future__ import annotations

import sys
from typing import Any

from examples.common.cli import run_cli
from examples.retrieval.config import RetrievalExperimentConfig


def _train(config: RetrievalExperimentConfig, resume: bool) -> dict[str, Any]:
    from examples.retrieval.trainer import RetrievalTrainer  # heavy imports after argument errors

    return RetrievalTrainer(config, resume=resume).fit()


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        argv,
        prog="python -m examples.retrieval",
        doc=__doc__,
        set_example="--set train.lr=5e-4 --set model.encoder=sasrec",
        config_cls=RetrievalExperimentConfig,
        train=_train,
    )


if __name__ == "__main__":
    sys.exit(main())
