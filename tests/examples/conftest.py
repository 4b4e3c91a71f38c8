"""Fixtures of the example-trainer tests: a retrieval config small enough to train in seconds on CPU."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from examples.common.config import load_config
from examples.retrieval.config import RetrievalExperimentConfig


@pytest.fixture
def retrieval_tiny() -> list[str]:
    """``--set`` overrides for a tiny synthetic retrieval run: 120 users -> 4 training batches per epoch."""
    return [
        "data.synthetic.num_users=120",
        "data.synthetic.num_items=80",
        "data.synthetic.num_topics=4",
        "data.synthetic.max_seq_len=30",
        "model.embedding_dim=16",
        "model.max_seq_len=20",
        "train.batch_size=32",
        "train.num_negatives=16",
        "train.eval_every=1",
        "output.progress=false",
        "output.tensorboard=false",
    ]


@pytest.fixture
def retrieval_config(retrieval_tiny: list[str]) -> Callable[..., RetrievalExperimentConfig]:
    """``make(out_dir, *overrides)``: the tiny retrieval config writing to ``out_dir``, plus ``overrides``."""

    def make(out: Path, *extra: str) -> RetrievalExperimentConfig:
        return load_config(RetrievalExperimentConfig, None, [*retrieval_tiny, f'output.dir="{out}"', *extra])

    return make
