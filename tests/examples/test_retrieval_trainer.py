"""The main job end to end: CLI on the synthetic default, exact resume, learning on real MovieLens-100K."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from examples.common.checkpoint import load_checkpoint
from examples.common.config import ConfigError, load_config
from examples.retrieval.__main__ import main
from examples.retrieval.config import RetrievalExperimentConfig
from examples.retrieval.trainer import RetrievalTrainer


def test_cli_end_to_end_on_synthetic_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], retrieval_tiny: list[str]
) -> None:
    out = tmp_path / "run"
    rc = main(
        [
            "--config",
            "examples/configs/synthetic.toml",
            "--output-dir",
            str(out),
            "--quiet",
            *[arg for s in [*retrieval_tiny, "train.epochs=2", "output.tensorboard=true"] for arg in ("--set", s)],
        ]
    )
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("hr@1", "hr@10", "hr@50", "hr@200", "ndcg@10", "ndcg@50", "ndcg@200", "mrr"):
        assert 0.0 <= results["test"][key] <= 1.0
    assert results["epochs"] == 2 and results["best_epoch"] in (1, 2)
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    assert any((out / "tensorboard").iterdir())
    printed = json.loads(capsys.readouterr().out)
    assert printed["test"] == results["test"]


def test_cli_rejects_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--set", "train.lr=-1", "--output-dir", str(tmp_path)]) == 2
    assert "train.lr must be > 0" in capsys.readouterr().err
    assert main(["--set", "train.learning_rate=1e-3"]) == 2
    assert "unknown key(s) ['learning_rate']" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="expected int"):
        load_config(RetrievalExperimentConfig, None, ['train.epochs="ten"'])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(RetrievalExperimentConfig, tmp_path / "nope.toml")


def _params(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_resume_mid_epoch_equals_uninterrupted_run(
    tmp_path: Path, retrieval_config: Callable[..., RetrievalExperimentConfig]
) -> None:
    full = RetrievalTrainer(retrieval_config(tmp_path / "full", "train.epochs=3")).fit()

    part = tmp_path / "part"
    # 120 users -> 4 batches per epoch: stop inside epoch 2, then resume to the end.
    stopped = RetrievalTrainer(retrieval_config(part, "train.epochs=3", "train.max_steps=6")).fit()
    assert stopped == {"stopped_at_step": 6}
    resumed = RetrievalTrainer(retrieval_config(part, "train.epochs=3"), resume=True).fit()

    a, b = _params(tmp_path / "full" / "last.pt"), _params(part / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"parameter {k} differs after resume")
    assert resumed["test"] == full["test"] and resumed["val_history"] == full["val_history"]


def test_resume_refuses_a_different_model(
    tmp_path: Path, retrieval_config: Callable[..., RetrievalExperimentConfig]
) -> None:
    RetrievalTrainer(retrieval_config(tmp_path, "train.epochs=1")).fit()
    with pytest.raises(ValueError, match="different data/model/optimizer config"):
        RetrievalTrainer(retrieval_config(tmp_path, "train.epochs=2", "model.embedding_dim=8"), resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        RetrievalTrainer(retrieval_config(tmp_path / "empty", "train.epochs=1"), resume=True)


def test_same_seed_same_result(tmp_path: Path, retrieval_config: Callable[..., RetrievalExperimentConfig]) -> None:
    a = RetrievalTrainer(retrieval_config(tmp_path / "a", "train.epochs=1", "model.encoder=sasrec")).fit()
    b = RetrievalTrainer(retrieval_config(tmp_path / "b", "train.epochs=1", "model.encoder=sasrec")).fit()
    assert a["test"] == b["test"]


@pytest.mark.slow
def test_loss_drops_on_movielens_100k(tmp_path: Path, ml100k_dir: Path) -> None:
    cfg = load_config(
        RetrievalExperimentConfig,
        "examples/configs/ml-100k.toml",
        [
            f'data.data_dir="{ml100k_dir}"',
            "data.download=false",
            "model.max_seq_len=50",
            "train.epochs=3",
            "train.eval_every=3",
            f'output.dir="{tmp_path}"',
            "output.progress=false",
        ],
    )
    results = RetrievalTrainer(cfg).fit()
    first, *_, last = results["train_loss_history"]
    assert last < first - 0.3, f"loss did not drop: first epoch {first:.3f}, last epoch {last:.3f}"
    assert results["test"]["hr@200"] > 200 / 1682  # better than random ranking
