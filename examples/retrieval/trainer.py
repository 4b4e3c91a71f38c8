"""RetrievalTrainer: data -> model -> sampled-softmax training with validation, checkpoints and exact resume."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch

from examples.common.trainer import EpochTrainer, dynamic_table_for_training
from examples.retrieval.config import DataConfig, RetrievalExperimentConfig
from gr_models.data.batching import EpochBatchSampler, NextItemEvalDataset, NextItemTrainDataset, make_dataloader
from gr_models.data.interactions import InteractionLog
from gr_models.data.movielens import load_movielens
from gr_models.data.sequences import build_user_sequences, leave_one_out_split
from gr_models.data.synthetic import generate_synthetic
from gr_models.modules.input_embedding import DynamicItemTableConfig
from gr_models.retrieval import RankingMetrics, RetrievalModelConfig, SampledSoftmaxLoss, evaluate_retrieval
from gr_models.retrieval.model import RetrievalModel

log = logging.getLogger("examples.retrieval")


def load_interactions(cfg: DataConfig) -> InteractionLog:
    if cfg.dataset == "synthetic":
        return generate_synthetic(cfg.synthetic)
    return load_movielens(cfg.dataset, cfg.data_dir, download=cfg.download)


class RetrievalTrainer(EpochTrainer):
    """Trains a next-item retrieval model as configured; ``fit()`` returns the results written to results.json.

    The loop state (epoch, batch within epoch, RNG states, optimizer, best validation) is checkpointed to
    ``<output.dir>/last.pt`` after every epoch (and every ``checkpoint_every_steps``); ``resume=True`` continues
    from there and reproduces an uninterrupted run exactly: the batch order is a pure function of (seed, epoch)
    and every random draw (dropout, negatives) comes from the checkpointed torch RNG.
    """

    def __init__(self, config: RetrievalExperimentConfig, *, resume: bool = False) -> None:
        super().__init__(config, log)
        tc = config.train

        t0 = time.perf_counter()
        interactions = load_interactions(config.data)
        sequences = build_user_sequences(interactions, min_interactions=config.data.min_interactions)
        self.split = leave_one_out_split(sequences)
        self.num_items = interactions.num_items
        max_len = config.model.max_seq_len
        self.train_set = NextItemTrainDataset(self.split.train, max_len)
        self.valid_set = NextItemEvalDataset(self.split, "valid", max_len)
        self.test_set = NextItemEvalDataset(self.split, "test", max_len)
        log.info(
            "data %s: %d users, %d items, %d interactions, %d train sequences (%.1fs)",
            interactions.source,
            len(sequences),
            self.num_items,
            len(interactions.items),
            len(self.train_set),
            time.perf_counter() - t0,
        )
        self.sampler = EpochBatchSampler(len(self.train_set), tc.batch_size, shuffle=True, seed=tc.seed)

        mc = config.model
        model_cfg = RetrievalModelConfig(
            num_items=self.num_items,
            encoder=mc.encoder,
            embedding_dim=mc.embedding_dim,
            max_seq_len=mc.max_seq_len,
            dropout=mc.dropout,
            position_init_std=mc.position_init_std,
            hstu=dataclasses.replace(mc.hstu),
            sasrec=dataclasses.replace(mc.sasrec),
            item_table=mc.item_table,
            dynamic_item_table=self._dynamic_item_table(),
        )
        self.model = RetrievalModel(model_cfg).to(self.device)
        self.loss_fn = SampledSoftmaxLoss(self.num_items, tc.num_negatives, tc.temperature, tc.negatives)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay
        )
        self._start(resume, counters=("train_sequences", "train_tokens"))

    def _dynamic_item_table(self) -> DynamicItemTableConfig:
        """The dynamic item table's settings; its fused optimizer follows train.lr and train.betas unless set."""
        table = self.config.model.dynamic_item_table
        if self.config.model.item_table != "dynamic":
            return dataclasses.replace(table)
        return dynamic_table_for_training(table, self.config.train)

    # ---------------------------------------------------------------- loop
    def _eval_loader(self, dataset: NextItemEvalDataset) -> Any:
        sampler = EpochBatchSampler(len(dataset), self.config.train.eval_batch_size, shuffle=False, seed=0)
        return make_dataloader(dataset, sampler)

    def evaluate(self, stage: str) -> dict[str, float]:
        dataset = self.valid_set if stage == "valid" else self.test_set
        return evaluate_retrieval(self.model, self._eval_loader(dataset), device=self.device, metrics=RankingMetrics())

    def _train_loader(self) -> Any:
        return make_dataloader(self.train_set, self.sampler)

    def _train_loss(self, batch: Any) -> torch.Tensor:
        queries = self.model(batch)
        loss = self.loss_fn(queries, batch.target_items, self.model.item_embeddings)
        self.state["train_sequences"] += len(batch)
        self.state["train_tokens"] += int(batch.target_items.numel())
        return loss

    def _valid_note(self, metrics: dict[str, float]) -> str:
        return f" hr@10={metrics['hr@10']:.4f}"

    def _results_head(self) -> dict[str, Any]:
        return {"encoder": self.config.model.encoder, "dataset": self.config.data.dataset}

    def _results_rates(self, wall: float) -> dict[str, Any]:
        st = self.state
        return {
            "train_sequences_per_s": round(st["train_sequences"] / wall, 2) if wall > 0 else None,
            "train_tokens_per_s": round(st["train_tokens"] / wall, 1) if wall > 0 else None,
        }
