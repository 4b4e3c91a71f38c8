"""RetrievalTrainer: data -> model -> sampled-softmax training with validation, checkpoints and exact resume."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from examples.common.checkpoint import load_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state
from examples.common.config import to_dict
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

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
RESULTS_FILE = "results.json"


def load_interactions(cfg: DataConfig) -> InteractionLog:
    if cfg.dataset == "synthetic":
        return generate_synthetic(cfg.synthetic)
    return load_movielens(cfg.dataset, cfg.data_dir, download=cfg.download)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available on this machine")
    return device


class RetrievalTrainer:
    """Trains a next-item retrieval model as configured; ``fit()`` returns the results written to results.json.

    The loop state (epoch, batch within epoch, RNG states, optimizer, best validation) is checkpointed to
    ``<output.dir>/last.pt`` after every epoch (and every ``checkpoint_every_steps``); ``resume=True`` continues
    from there and reproduces an uninterrupted run exactly: the batch order is a pure function of (seed, epoch)
    and every random draw (dropout, negatives) comes from the checkpointed torch RNG.
    """

    def __init__(self, config: RetrievalExperimentConfig, *, resume: bool = False) -> None:
        self.config = config
        self.out_dir = Path(config.output.dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tc = config.train
        if tc.num_threads > 0:
            torch.set_num_threads(tc.num_threads)
        self.device = resolve_device(tc.device)
        seed_everything(tc.seed)

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
        self.state: dict[str, Any] = {
            "epoch": 0,  # epoch in progress (or next to start)
            "batch_in_epoch": 0,  # batches of that epoch already trained
            "global_step": 0,
            "best_metric": float("-inf"),
            "best_epoch": -1,
            "evals_since_best": 0,
            "val_history": [],
            "train_wall_s": 0.0,
            "train_sequences": 0,
            "train_tokens": 0,
            "epoch_loss_sum": 0.0,  # running sum over the epoch in progress (checkpointed for exact resume)
            "epoch_batches": 0,
            "train_loss_history": [],  # mean training loss of every finished epoch
            "finished": False,
        }
        if resume:
            self._resume()
        self.writer = self._make_writer()

    def _dynamic_item_table(self) -> DynamicItemTableConfig:
        """The dynamic item table's settings; its fused optimizer follows train.lr and train.betas unless set."""
        tc, table = self.config.train, dataclasses.replace(self.config.model.dynamic_item_table)
        if self.config.model.item_table != "dynamic":
            return table
        if tc.weight_decay:
            raise ValueError(
                "model.item_table='dynamic' trains the item table with a fused optimizer that has no weight decay; "
                f"set train.weight_decay=0 (got {tc.weight_decay}) or use the static item table"
            )
        if table.lr is None:
            table.lr = tc.lr
            table.beta1, table.beta2 = tc.betas
        return table

    # ---------------------------------------------------------------- checkpoints
    def _config_fingerprint(self) -> dict[str, Any]:
        cfg = to_dict(self.config)
        # Loop-length, output and runtime knobs may change on resume; everything that shapes the math may not.
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

    def _make_writer(self) -> Any:
        if not self.config.output.tensorboard:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

    def _scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    # ---------------------------------------------------------------- loop
    def _eval_loader(self, dataset: NextItemEvalDataset) -> Any:
        sampler = EpochBatchSampler(len(dataset), self.config.train.eval_batch_size, shuffle=False, seed=0)
        return make_dataloader(dataset, sampler)

    def evaluate(self, stage: str) -> dict[str, float]:
        dataset = self.valid_set if stage == "valid" else self.test_set
        return evaluate_retrieval(self.model, self._eval_loader(dataset), device=self.device, metrics=RankingMetrics())

    def _train_epoch(self, epoch: int) -> bool:
        """Trains the rest of ``epoch``; returns False when ``max_steps`` stopped it midway."""
        tc = self.config.train
        self.model.train()
        self.sampler.set_epoch(epoch)
        self.sampler.start_batch = self.state["batch_in_epoch"]
        loader = make_dataloader(self.train_set, self.sampler)
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
            queries = self.model(batch)
            loss = self.loss_fn(queries, batch.target_items, self.model.item_embeddings)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()

            st = self.state
            st["global_step"] += 1
            st["batch_in_epoch"] += 1
            st["train_sequences"] += len(batch)
            st["train_tokens"] += int(batch.target_items.numel())
            loss_value = float(loss.detach())
            st["epoch_loss_sum"] += loss_value
            st["epoch_batches"] += 1
            bar.set_postfix(loss=f"{loss_value:.4f}")
            self._scalar("train/loss", loss_value, st["global_step"])
            if tc.checkpoint_every_steps and st["global_step"] % tc.checkpoint_every_steps == 0:
                st["train_wall_s"] += time.perf_counter() - t_start
                t_start = time.perf_counter()
                self._save_last()
            if tc.max_steps and st["global_step"] >= tc.max_steps:
                self.state["train_wall_s"] += time.perf_counter() - t_start
                return False
        st = self.state
        st["train_wall_s"] += time.perf_counter() - t_start
        st["train_loss_history"].append(st["epoch_loss_sum"] / max(st["epoch_batches"], 1))
        self._scalar("train/epoch_loss", st["train_loss_history"][-1], epoch + 1)
        st["epoch"], st["batch_in_epoch"], st["epoch_loss_sum"], st["epoch_batches"] = epoch + 1, 0, 0.0, 0
        return True

    def _validate(self, epoch: int) -> bool:
        """Runs validation after ``epoch``; keeps the best checkpoint; returns True when early stopping triggers."""
        tc = self.config.train
        metrics = self.evaluate("valid")
        st = self.state
        st["val_history"].append({"epoch": epoch, **metrics})
        for name, value in metrics.items():
            self._scalar(f"valid/{name}", value, epoch)
        if tc.select_metric not in metrics:
            raise ValueError(f"train.select_metric={tc.select_metric!r} is not one of {sorted(metrics)}")
        score = metrics[tc.select_metric]
        improved = score > st["best_metric"]
        if improved:
            st["best_metric"], st["best_epoch"], st["evals_since_best"] = score, epoch, 0
            save_checkpoint(self.out_dir / BEST_CHECKPOINT, {"model": self.model.state_dict(), "epoch": epoch})
        else:
            st["evals_since_best"] += 1
        log.info(
            "epoch %d valid %s=%.4f hr@10=%.4f%s",
            epoch,
            tc.select_metric,
            score,
            metrics["hr@10"],
            " (best)" if improved else "",
        )
        return bool(tc.early_stop_patience and st["evals_since_best"] >= tc.early_stop_patience)

    def fit(self) -> dict[str, Any]:
        tc = self.config.train
        st = self.state
        epochs_bar = tqdm(
            range(st["epoch"], tc.epochs), desc="train", disable=not self.config.output.progress, unit="epoch"
        )
        for epoch in epochs_bar:
            if st["finished"]:
                break
            if not self._train_epoch(epoch):
                self._save_last()
                log.info("stopped after max_steps=%d (global step %d)", tc.max_steps, st["global_step"])
                return {"stopped_at_step": st["global_step"]}
            done = epoch + 1
            stop = False
            if done % tc.eval_every == 0 or done == tc.epochs:
                stop = self._validate(done)
            if stop:
                st["finished"] = True
                log.info("early stop: %d validations without improvement", tc.early_stop_patience)
            self._save_last()
            if stop:
                break
        return self._finish()

    def _finish(self) -> dict[str, Any]:
        st = self.state
        if st["best_epoch"] < 0:  # no validation ran (e.g. epochs already reached): validate now
            self._validate(st["epoch"])
        best = load_checkpoint(self.out_dir / BEST_CHECKPOINT)
        self.model.load_state_dict(best["model"])
        wall = st["train_wall_s"]
        results = {
            "encoder": self.config.model.encoder,
            "dataset": self.config.data.dataset,
            "val": self.evaluate("valid"),
            "test": self.evaluate("test"),
            "best_epoch": st["best_epoch"],
            "epochs": st["epoch"],
            "global_steps": st["global_step"],
            "wall_s": round(wall, 2),
            "train_sequences_per_s": round(st["train_sequences"] / wall, 2) if wall > 0 else None,
            "train_tokens_per_s": round(st["train_tokens"] / wall, 1) if wall > 0 else None,
            "val_history": st["val_history"],
            "train_loss_history": st["train_loss_history"],
            "config": to_dict(self.config),
            "torch": torch.__version__,
            "device": str(self.device),
        }
        path = self.out_dir / RESULTS_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(path)
        if self.writer is not None:
            for name, value in results["test"].items():
                self.writer.add_scalar(f"test/{name}", value, st["epoch"])
            self.writer.close()
        log.info("test %s -> %s", {k: round(v, 4) for k, v in results["test"].items()}, path)
        return results
