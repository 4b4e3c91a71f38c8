"""The retrieval trainer with its item table switched to a gr-dynemb hash table by one config flag."""

from __future__ import annotations

import builtins
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from examples.common.checkpoint import load_checkpoint
from examples.common.config import ConfigError
from examples.retrieval.config import RetrievalExperimentConfig
from examples.retrieval.trainer import RetrievalTrainer
from gr_models.modules.input_embedding import DynamicItemTableConfig, ItemInputEmbedding


def test_trainer_with_dynamic_item_table_trains_evaluates_and_resumes(
    tmp_path: Path, retrieval_config: Callable[..., RetrievalExperimentConfig]
) -> None:
    cfg = retrieval_config(tmp_path / "full", "train.epochs=2", 'model.item_table="dynamic"')
    trainer = RetrievalTrainer(cfg)
    items = trainer.model.input_embedding.item_embeddings
    from gr_dynemb import DynamicEmbeddingCollection

    assert isinstance(items, DynamicEmbeddingCollection)
    table = items.table("item_table")
    assert table.config.optimizer.lr == cfg.train.lr and table.config.optimizer.beta2 == cfg.train.betas[1]
    assert not any(p is t for p in trainer.model.parameters() for t in [table._grad_anchor])

    # Evaluation scores every item without inserting: ids never trained read their initializer row.
    trainer.model.eval()
    with torch.no_grad():
        before = trainer.model.all_item_embeddings()
    assert table.table.size() == 0 and before.shape == (trainer.num_items, 16)
    assert torch.isfinite(before).all() and (before.norm(dim=1) > 0.99).all()

    results = trainer.fit()
    assert 0 < table.table.size() <= trainer.num_items  # the rows the training batches touched
    assert all(math.isfinite(x) for x in results["train_loss_history"])
    assert results["train_loss_history"][1] < results["train_loss_history"][0]
    for key in ("hr@10", "ndcg@10", "mrr"):
        assert 0.0 <= results["test"][key] <= 1.0
    # The checkpoint holds the table's rows; trained rows moved away from their initial values.
    state = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    keys = state["input_embedding.item_embeddings.table_item_table.table_keys"]
    assert keys.numel() == table.table.size()
    trainer.model.eval()
    with torch.no_grad():
        after = trainer.model.all_item_embeddings()
    assert not torch.allclose(after[keys], before[keys])

    # Stopping mid-run and resuming gives the uninterrupted run's table.
    part = tmp_path / "part"
    assert RetrievalTrainer(
        retrieval_config(part, "train.epochs=2", 'model.item_table="dynamic"', "train.max_steps=5")
    ).fit()
    RetrievalTrainer(retrieval_config(part, "train.epochs=2", 'model.item_table="dynamic"'), resume=True).fit()
    resumed = load_checkpoint(part / "last.pt")["model"]
    prefix = "input_embedding.item_embeddings.table_item_table."
    order_a, order_b = state[prefix + "table_keys"].argsort(), resumed[prefix + "table_keys"].argsort()
    torch.testing.assert_close(resumed[prefix + "table_keys"][order_b], state[prefix + "table_keys"][order_a])
    torch.testing.assert_close(resumed[prefix + "table_values"][order_b], state[prefix + "table_values"][order_a])


def test_dynamic_flag_errors_are_clear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, retrieval_config: Callable[..., RetrievalExperimentConfig]
) -> None:
    with pytest.raises(ValueError, match="weight decay"):
        RetrievalTrainer(retrieval_config(tmp_path, 'model.item_table="dynamic"', "train.weight_decay=0.01"))
    with pytest.raises(ConfigError, match=r"model\.item_table: must be one of"):
        retrieval_config(tmp_path, 'model.item_table="hashed"')
    real_import = builtins.__import__

    def no_dynemb(name: str, *args: object, **kwargs: object) -> object:
        if name == "gr_dynemb" or name.startswith("gr_dynemb."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dynemb)
    with pytest.raises(ImportError, match=r"pip install 'gr-models\[dynemb\]'"):
        ItemInputEmbedding(10, 4, 5, 0.0, dynamic=DynamicItemTableConfig())
