"""The ranking example end to end: CLI on the synthetic default, both models, exact resume, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from examples.common.checkpoint import load_checkpoint
from examples.common.config import load_config
from examples.ranking.__main__ import main
from examples.ranking.config import RankingExperimentConfig
from examples.ranking.trainer import RankingTrainer
from gr_models.serving.bundle import load_bundle

TINY = [
    "data.synthetic.num_users=60",
    "data.synthetic.num_items=50",
    "data.synthetic.num_topics=4",
    "data.synthetic.min_seq_len=20",
    "data.synthetic.max_seq_len=30",
    "data.num_candidates=5",
    "data.max_history=10",
    "model.embedding_dim=8",
    "model.head_hidden=16",
    "model.dlrm_hidden=[16, 8]",
    "train.batch_size=16",
    "train.num_threads=1",
    "output.progress=false",
]


def _config(out: Path, *extra: str) -> RankingExperimentConfig:
    return load_config(
        RankingExperimentConfig, None, [*TINY, f'output.dir="{out}"', "output.tensorboard=false", *extra]
    )


@pytest.mark.parametrize("model", ["hstu", "dlrm"])
def test_cli_end_to_end_on_synthetic(model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / model
    overrides = [*TINY, "train.epochs=2", f"model.type={model}", "output.tensorboard=true"]
    argv = ["--config", "examples/configs/ranking-synthetic.toml", "--output-dir", str(out), "--quiet"]
    assert main([*argv, *[a for s in overrides for a in ("--set", s)]]) == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("like/auc", "like/gauc", "like/accuracy"):
        assert 0.0 <= results["test"][key] <= 1.0
    assert results["test"]["like/ne"] > 0 and results["test"]["rating/mse"] > 0
    assert results["epochs"] == 2 and results["model"] == model and len(results["val_history"]) == 2
    assert (out / "best.pt").is_file() and any((out / "tensorboard").iterdir())
    # HSTU runs leave a serving bundle of the best weights (gr_models.serving.bundle); DLRM has none.
    assert (out / "model_bundle.pt").is_file() == (model == "hstu")
    if model == "hstu":
        best = load_checkpoint(out / "best.pt")["model"]
        served = load_bundle(out / "model_bundle.pt").model.state_dict()
        assert served.keys() == best.keys() and all(torch.equal(served[k], v) for k, v in best.items())
    assert json.loads(capsys.readouterr().out)["test"] == results["test"]


def test_resume_reproduces_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = RankingTrainer(_config(tmp_path / "a", "train.epochs=2")).fit()
    # Stop mid-epoch 1 (5 steps), then resume twice from the checkpoint.
    assert RankingTrainer(_config(tmp_path / "b", "train.epochs=2", "train.max_steps=5")).fit() == {
        "stopped_at_step": 5
    }
    resumed = RankingTrainer(_config(tmp_path / "b", "train.epochs=2"), resume=True).fit()
    assert resumed["test"] == straight["test"] and resumed["train_loss_history"] == straight["train_loss_history"]
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0)
    with pytest.raises(ValueError, match="different data/model/optimizer config"):
        RankingTrainer(_config(tmp_path / "b", "train.lr=0.5"), resume=True)


def test_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--set", "model.type=gbdt", "--output-dir", str(tmp_path)]) == 2
    assert "model.type" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not in the data"):
        RankingTrainer(_config(tmp_path, "model.tasks=[{name = 'is_click'}]"))
    with pytest.raises(ValueError, match="select_metric"):
        RankingTrainer(_config(tmp_path / "s", "train.epochs=1", "train.select_metric='auc'")).fit()


def test_dynamic_item_table_trains_and_resumes_exactly(tmp_path: Path) -> None:
    pytest.importorskip("gr_dynemb")
    dyn = ["model.item_table=dynamic", "train.epochs=2"]
    straight = RankingTrainer(_config(tmp_path / "a", *dyn)).fit()
    RankingTrainer(_config(tmp_path / "b", *dyn, "train.max_steps=4")).fit()
    resumed = RankingTrainer(_config(tmp_path / "b", *dyn), resume=True).fit()
    assert resumed["test"] == straight["test"] and 0.0 <= straight["test"]["like/auc"] <= 1.0
    with pytest.raises(ValueError, match="no weight decay"):
        RankingTrainer(_config(tmp_path / "c", *dyn, "train.weight_decay=0.1"))


def test_causal_context_trains_and_its_bundle_keeps_it(tmp_path: Path) -> None:
    # The variant a KV-cached server can extend exactly (gr_models.inference); the serving bundle must say so.
    out = tmp_path / "causal"
    results = RankingTrainer(_config(out, "train.epochs=1", 'model.context_attention="causal"')).fit()
    assert 0.0 <= results["test"]["like/auc"] <= 1.0
    assert load_bundle(out / "model_bundle.pt").model.config.context_attention == "causal"
    with pytest.raises(ValueError, match="context_attention"):
        RankingTrainer(_config(tmp_path / "bad", 'model.context_attention="sideways"'))
