"""RankingTrainer: ranking windows -> HSTU ranking or DLRM baseline -> multi-task training with validation,
best checkpoint, exact resume and results.json."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from examples.common.checkpoint import load_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state
from examples.common.config import to_dict
from examples.common.runtime import ScalarLog, resolve_device, write_json_atomic
from examples.ranking.config import DataConfig, ModelConfig, RankingExperimentConfig
from gr_models.data.batching import EpochBatchSampler
from gr_models.data.ranking import RankingDataset, RankingLog, make_ranking_dataloader, ranking_split
from gr_models.modules.input_embedding import DynamicItemTableConfig
from gr_models.ranking import (
    DLRMConfig,
    DLRMRankingModel,
    HSTURankingConfig,
    HSTURankingModel,
    MultiTaskLoss,
    RankingFeatureSpec,
    RankingMetrics,
    check_tasks,
)

log = logging.getLogger("examples.ranking")

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
RESULTS_FILE = "results.json"


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
    mc, tc = config.model, config.train
    if mc.item_table != "dynamic":
        return None
    if tc.weight_decay:
        raise ValueError(
            "model.item_table='dynamic' trains the item table with a fused optimizer that has no weight decay; "
            f"set train.weight_decay=0 (got {tc.weight_decay}) or use the static item table"
        )
    table = dataclasses.replace(mc.dynamic_item_table)
    if table.lr is None:
        table.lr = tc.lr
        table.beta1, table.beta2 = tc.betas
    return table


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
            embedding_dim=mc.embedding_dim,
            max_seq_len=max_seq_len,
            dropout=mc.dropout,
            head_hidden=mc.head_hidden,
            hstu=dataclasses.replace(mc.hstu),
            dynamic_item_table=dynamic,
        )
    )


class RankingTrainer:
    """Trains the configured ranking model; ``fit()`` returns what it writes to results.json.

    Checkpoints ``<output.dir>/last.pt`` after every epoch (and every ``checkpoint_every_steps``) with the model,
    optimizer, RNG states and loop position; ``resume=True`` continues from it and reproduces an uninterrupted run
    exactly (the batch order is a pure function of (seed, epoch); dropout draws from the checkpointed RNG).
    """

    def __init__(self, config: RankingExperimentConfig, *, resume: bool = False) -> None:
        self.config = config
        self.out_dir = Path(config.output.dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tc, dc, mc = config.train, config.data, config.model
        if tc.num_threads > 0:
            torch.set_num_threads(tc.num_threads)
        self.device = resolve_device(tc.device)
        seed_everything(tc.seed)

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
        self.sampler = EpochBatchSampler(len(self.datasets["train"]), tc.batch_size, shuffle=True, seed=tc.seed)

        spec = RankingFeatureSpec.of_log(self.log_data)
        tokens = 2 if mc.action_mode == "interleave" else 1
        needed = spec.num_user_features + tokens * dc.max_history + dc.num_candidates
        dynamic = dynamic_item_table(config)
        self.model = build_model(mc, spec, mc.max_seq_len or needed, dynamic).to(self.device)
        self._init_regression_bias()
        self.loss_fn = MultiTaskLoss(self.model.config.tasks)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay
        )
        self.state: dict[str, Any] = {
            "epoch": 0,
            "batch_in_epoch": 0,
            "global_step": 0,
            "best_metric": float("-inf"),
            "best_epoch": -1,
            "evals_since_best": 0,
            "val_history": [],
            "train_wall_s": 0.0,
            "train_candidates": 0,
            "epoch_loss_sum": 0.0,
            "epoch_batches": 0,
            "train_loss_history": [],
            "finished": False,
        }
        if resume:
            self._resume()
        self.scalars = ScalarLog(self.out_dir, config.output.tensorboard)

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

    # ---------------------------------------------------------------- checkpoints
    def _config_fingerprint(self) -> dict[str, Any]:
        cfg = to_dict(self.config)
        for key in ("epochs", "max_steps", "checkpoint_every_steps", "num_threads", "early_stop_patience", "device"):
            cfg["train"].pop(key)
        cfg.pop("output")
        return cfg

    def _save_last(self) -> None:
        save_checkpoint(
            self.out_dir / LAST_CHECKPOINT,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "rng": rng_state(),
                "state": self.state,
                "config": self._config_fingerprint(),
            },
        )

    def _resume(self) -> None:
        path = self.out_dir / LAST_CHECKPOINT
        if not path.is_file():
            raise FileNotFoundError(f"--resume given but no checkpoint at {path}")
        ckpt = load_checkpoint(path)
        if ckpt["config"] != self._config_fingerprint():
            raise ValueError(
                f"cannot resume from {path}: it was written with a different data/model/optimizer config; "
                "use a new output.dir or the same config"
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.state = ckpt["state"]
        set_rng_state(ckpt["rng"])
        log.info("resumed from %s at epoch %d, batch %d", path, self.state["epoch"], self.state["batch_in_epoch"])

    # ---------------------------------------------------------------- loop
    @torch.no_grad()
    def evaluate(self, stage: str) -> dict[str, float]:
        dataset = self.datasets[stage]
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

    def _train_epoch(self, epoch: int) -> bool:
        """Trains the rest of ``epoch``; False when ``max_steps`` stopped it midway."""
        tc, st = self.config.train, self.state
        self.model.train()
        self.sampler.set_epoch(epoch, st["batch_in_epoch"])
        loader = make_ranking_dataloader(self.datasets["train"], self.sampler)
        bar = tqdm(
            loader,
            total=len(self.sampler) - self.sampler.start_batch,
            desc=f"epoch {epoch}",
            disable=not self.config.output.progress,
            leave=False,
        )
        t_start = time.perf_counter()
        for batch in bar:
            batch = batch.to(self.device)
            loss, _ = self.loss_fn(self.model(batch), batch.labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()

            st["global_step"] += 1
            st["batch_in_epoch"] += 1
            st["train_candidates"] += int(batch.candidate_items.numel())
            value = float(loss.detach())
            st["epoch_loss_sum"] += value
            st["epoch_batches"] += 1
            bar.set_postfix(loss=f"{value:.4f}")
            self.scalars.scalar("train/loss", value, st["global_step"])
            if tc.checkpoint_every_steps and st["global_step"] % tc.checkpoint_every_steps == 0:
                st["train_wall_s"] += time.perf_counter() - t_start
                t_start = time.perf_counter()
                self._save_last()
            if tc.max_steps and st["global_step"] >= tc.max_steps:
                st["train_wall_s"] += time.perf_counter() - t_start
                return False
        st["train_wall_s"] += time.perf_counter() - t_start
        st["train_loss_history"].append(st["epoch_loss_sum"] / max(st["epoch_batches"], 1))
        self.scalars.scalar("train/epoch_loss", st["train_loss_history"][-1], epoch + 1)
        st["epoch"], st["batch_in_epoch"], st["epoch_loss_sum"], st["epoch_batches"] = epoch + 1, 0, 0.0, 0
        return True

    def _validate(self, epoch: int) -> bool:
        """Validates after ``epoch``, keeps the best checkpoint; True when early stopping triggers."""
        tc, st = self.config.train, self.state
        metrics = self.evaluate("valid")
        st["val_history"].append({"epoch": epoch, **metrics})
        for name, value in metrics.items():
            self.scalars.scalar(f"valid/{name}", value, epoch)
        if tc.select_metric not in metrics:
            raise ValueError(f"train.select_metric={tc.select_metric!r} is not one of {sorted(metrics)}")
        score = metrics[tc.select_metric]
        improved = score > st["best_metric"]
        if improved:
            st["best_metric"], st["best_epoch"], st["evals_since_best"] = score, epoch, 0
            save_checkpoint(self.out_dir / BEST_CHECKPOINT, {"model": self.model.state_dict(), "epoch": epoch})
        else:
            st["evals_since_best"] += 1
        log.info("epoch %d valid %s=%.4f%s", epoch, tc.select_metric, score, " (best)" if improved else "")
        return bool(tc.early_stop_patience and st["evals_since_best"] >= tc.early_stop_patience)

    def fit(self) -> dict[str, Any]:
        tc, st = self.config.train, self.state
        bar = tqdm(range(st["epoch"], tc.epochs), desc="train", disable=not self.config.output.progress, unit="epoch")
        for epoch in bar:
            if st["finished"]:
                break
            if not self._train_epoch(epoch):
                self._save_last()
                log.info("stopped after max_steps=%d (global step %d)", tc.max_steps, st["global_step"])
                return {"stopped_at_step": st["global_step"]}
            done = epoch + 1
            stop = self._validate(done) if done % tc.eval_every == 0 or done == tc.epochs else False
            if stop:
                st["finished"] = True
                log.info("early stop: %d validations without improvement", tc.early_stop_patience)
            self._save_last()
            if stop:
                break
        return self._finish()

    def _finish(self) -> dict[str, Any]:
        st = self.state
        if st["best_epoch"] < 0:
            self._validate(st["epoch"])
        self.model.load_state_dict(load_checkpoint(self.out_dir / BEST_CHECKPOINT)["model"])
        wall = st["train_wall_s"]
        results = {
            "model": self.config.model.type,
            "dataset": self.config.data.dataset,
            "val": self.evaluate("valid"),
            "test": self.evaluate("test"),
            "best_epoch": st["best_epoch"],
            "epochs": st["epoch"],
            "global_steps": st["global_step"],
            "wall_s": round(wall, 2),
            "train_candidates_per_s": round(st["train_candidates"] / wall, 1) if wall > 0 else None,
            "windows": {stage: len(ds) for stage, ds in self.datasets.items()},
            "val_history": st["val_history"],
            "train_loss_history": st["train_loss_history"],
            "config": to_dict(self.config),
            "torch": torch.__version__,
            "device": str(self.device),
        }
        write_json_atomic(self.out_dir / RESULTS_FILE, results)
        for name, value in results["test"].items():
            self.scalars.scalar(f"test/{name}", value, st["epoch"])
        self.scalars.close()
        log.info("test %s -> %s", {k: round(v, 4) for k, v in results["test"].items()}, self.out_dir / RESULTS_FILE)
        return results
