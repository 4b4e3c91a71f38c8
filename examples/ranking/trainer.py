"""RankingTrainer: ranking windows -> HSTU ranking or DLRM baseline -> multi-task training with validation,
best checkpoint, exact resume and results.json."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from examples.common.parallel_trainer import ParallelEpochTrainer
from examples.common.trainer import dynamic_table_for_training
from examples.ranking.config import DataConfig, ModelConfig, RankingExperimentConfig
from gr_models.data.batching import EpochBatchSampler
from gr_models.data.ranking import RankingDataset, RankingLog, make_ranking_dataloader, ranking_split
from gr_models.modules.input_embedding import DynamicItemTableConfig
from gr_models.ranking.dlrm import DLRMConfig, DLRMRankingModel
from gr_models.ranking.features import RankingFeatureSpec
from gr_models.ranking.hstu_ranking import HSTURankingConfig, HSTURankingModel
from gr_models.ranking.metrics import RankingMetrics
from gr_models.ranking.tasks import MultiTaskLoss, check_tasks
from gr_models.serving.bundle import save_bundle

log = logging.getLogger("examples.ranking")
BUNDLE_FILE = "model_bundle.pt"  # the best weights + config for gr-serve (gr_models.serving.bundle)


def load_ranking_log(cfg: DataConfig) -> RankingLog:
    if cfg.dataset == "synthetic":
        from gr_models.data.ranking_sources import synthetic_ranking

        return synthetic_ranking(cfg.synthetic)
    if cfg.dataset == "kuairand-1k":
        from gr_models.data.kuairand import load_kuairand_ranking

        return load_kuairand_ranking(cfg.data_dir, download=cfg.download)
    from gr_models.data.ranking_sources import load_movielens_ranking

    return load_movielens_ranking(cfg.dataset, cfg.data_dir, download=cfg.download)


def dynamic_item_table(config: RankingExperimentConfig) -> DynamicItemTableConfig | None:
    """The dynamic item table's settings (None for the static table); its fused optimizer follows train.lr and
    train.betas unless set."""
    if config.model.item_table != "dynamic":
        return None
    return dynamic_table_for_training(config.model.dynamic_item_table, config.train)


def build_model(
    mc: ModelConfig, spec: RankingFeatureSpec, max_seq_len: int, dynamic: DynamicItemTableConfig | None = None
) -> nn.Module:
    tasks = [dataclasses.replace(t) for t in mc.tasks]
    if mc.type == "dlrm":
        return DLRMRankingModel(
            DLRMConfig(spec, tasks, mc.embedding_dim, tuple(mc.dlrm_hidden), mc.dropout, dynamic_item_table=dynamic)
        )
    return HSTURankingModel(
        HSTURankingConfig(
            features=spec,
            tasks=tasks,
            action_mode=mc.action_mode,
            context_attention=mc.context_attention,
            embedding_dim=mc.embedding_dim,
            max_seq_len=max_seq_len,
            dropout=mc.dropout,
            head_hidden=mc.head_hidden,
            hstu=dataclasses.replace(mc.hstu),
            dynamic_item_table=dynamic,
        )
    )


def window_lengths(dataset: RankingDataset, num_user_features: int, tokens_per_event: int) -> np.ndarray:
    """Tokens of every window in the HSTU ranking sequence: user features, history events, candidates."""
    w = dataset.windows
    history = np.asarray(w.cand_start) - np.asarray(w.hist_start)
    candidates = np.asarray(w.cand_end) - np.asarray(w.cand_start)
    return num_user_features + tokens_per_event * history + candidates


class RankingTrainer(ParallelEpochTrainer):
    """Trains the configured ranking model; ``fit()`` returns what it writes to results.json.

    Checkpoints ``<output.dir>/last.pt`` after every epoch (and every ``checkpoint_every_steps``) with the model,
    optimizer, RNG states and loop position; ``resume=True`` continues from it and reproduces an uninterrupted run
    exactly (the batch order is a pure function of (seed, epoch); dropout draws from the checkpointed RNG).

    Under torchrun it trains the same global batches data (and, for HSTU, tensor) parallel; see
    ``examples.common.parallel_trainer``. The serving bundle is written by single-process runs.
    """

    def __init__(self, config: RankingExperimentConfig, *, resume: bool = False) -> None:
        dc, mc = config.data, config.model
        super().__init__(config, log, num_heads=mc.hstu.num_heads if mc.type == "hstu" else None, encoder=mc.type)

        t0 = time.perf_counter()
        self.log_data = load_ranking_log(dc)
        check_tasks(mc.tasks, set(self.log_data.labels))
        windows = ranking_split(
            self.log_data, dc.num_candidates, dc.max_history, dc.min_history, dc.train_stride or None
        )
        self.datasets = {stage: RankingDataset(self.log_data, w) for stage, w in windows.items()}
        log.info(
            "data %s: %d users, %d items; windows train %d / valid %d / test %d (%.1fs)",
            self.log_data.source,
            len(self.log_data.users),
            self.log_data.num_items,
            *(len(self.datasets[s]) for s in ("train", "valid", "test")),
            time.perf_counter() - t0,
        )
        spec = RankingFeatureSpec.of_log(self.log_data)
        tokens = 2 if mc.action_mode == "interleave" else 1
        train = self.datasets["train"]
        self.sampler = self._train_sampler(
            len(train), lambda: window_lengths(train, spec.num_user_features, tokens), mc.embedding_dim
        )
        needed = spec.num_user_features + tokens * dc.max_history + dc.num_candidates
        dynamic = dynamic_item_table(config)
        self.model = build_model(mc, spec, mc.max_seq_len or needed, dynamic).to(self.device)
        self._init_regression_bias()
        self.model = self._parallelize(self.model)
        self.loss_fn = MultiTaskLoss(self.model.config.tasks)
        self.optimizer = self._optimizer(self.model)
        self._start(resume, counters=("train_candidates",))

    def _init_regression_bias(self) -> None:
        """Regression outputs start at their training-label mean (ratings ~3.5, not 0)."""
        train = self.datasets["train"]
        w = train.windows
        rows = torch.cat([torch.arange(int(s), int(e)) for s, e in zip(w.cand_start, w.cand_end, strict=True)]).numpy()
        bias = torch.zeros(len(self.model.config.tasks))
        for j, task in enumerate(self.model.config.tasks):
            if task.kind == "regression":
                bias[j] = float(self.log_data.labels[task.label_name][rows].mean())
        self.model.heads.set_output_bias(bias)

    # ---------------------------------------------------------------- loop
    @torch.no_grad()
    def evaluate(self, stage: str) -> dict[str, float]:
        dataset = self.datasets[stage]
        if self.distributed:
            return self._evaluate_sharded(dataset)
        sampler = EpochBatchSampler(len(dataset), self.config.train.eval_batch_size, shuffle=False, seed=0)
        metrics = RankingMetrics([t.spec() for t in self.model.config.tasks])
        was_training = self.model.training
        self.model.eval()
        for batch in make_ranking_dataloader(dataset, sampler):
            batch = batch.to(self.device)
            labels = {t.name: batch.labels[t.label_name] for t in self.model.config.tasks}
            metrics.update(self.model(batch), labels, batch.candidate_users)
        self.model.train(was_training)
        return metrics.compute()

    def _evaluate_sharded(self, dataset: RankingDataset) -> dict[str, float]:
        """This DP rank's shard of ``dataset``; every candidate's predictions, labels and user are gathered in
        dataset order and scored once, so every rank returns what one process computes from the same numbers."""
        tasks = self.model.config.tasks
        w = dataset.windows
        candidates = np.asarray(w.cand_end) - np.asarray(w.cand_start)
        batches, valid = self._eval_shard(len(dataset))
        was_training = self.model.training
        self.model.eval()
        rows = []
        try:
            for indices, n in zip(batches, valid, strict=True):
                batch = dataset.collate(indices).to(self.device)
                keep = int(candidates[indices[:n]].sum())
                labels = torch.stack([batch.labels[t.label_name] for t in tasks], dim=1)
                columns = (self.model(batch).float(), labels.float(), batch.candidate_users.unsqueeze(1).double())
                rows.append(torch.cat([c.double() for c in columns], dim=1)[:keep])
        finally:
            self.model.train(was_training)
        table = self._gather_rows(torch.cat(rows)).cpu()  # float64: exact for fp32 values and int user ids
        k = len(tasks)
        metrics = RankingMetrics([t.spec() for t in tasks])
        labels = {t.name: table[:, k + j].float() for j, t in enumerate(tasks)}
        metrics.update(table[:, :k].float(), labels, table[:, 2 * k].long())
        return metrics.compute()

    def _train_loader(self) -> Any:
        return self._distributed_batches(make_ranking_dataloader(self.datasets["train"], self.sampler))

    def _loss_count(self, batch: Any) -> int:
        return int(batch.candidate_items.numel())

    def _train_loss(self, batch: Any) -> torch.Tensor:
        loss, _ = self.loss_fn(self.model(batch), batch.labels)
        self.state["train_candidates"] += int(batch.candidate_items.numel())
        return loss

    def _finish(self) -> dict[str, Any]:
        results = super()._finish()  # leaves the best weights in self.model
        if self.distributed:
            log.info("no serving bundle from a distributed run (its tables are sharded); train one process for it")
        elif isinstance(self.model, HSTURankingModel) and self.model.config.dynamic_item_table is None:
            meta = {"dataset": self.config.data.dataset, "best_epoch": str(self.state["best_epoch"])}
            log.info("serving bundle -> %s", save_bundle(self.model, self.out_dir / BUNDLE_FILE, metadata=meta))
        return results

    def _results_head(self) -> dict[str, Any]:
        return {"model": self.config.model.type, "dataset": self.config.data.dataset}

    def _results_rates(self, wall: float) -> dict[str, Any]:
        return {
            "train_candidates_per_s": round(self.state["train_candidates"] / wall, 1) if wall > 0 else None,
            "windows": {stage: len(ds) for stage, ds in self.datasets.items()},
        }
