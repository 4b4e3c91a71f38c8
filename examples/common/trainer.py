"""The training loop both example trainers share: epochs with exact mid-epoch resume, validation that keeps the best
checkpoint, early stopping, ``max_steps``, and results.json. Subclasses supply data, model, loss and evaluation."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from examples.common.checkpoint import load_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state
from examples.common.config import to_dict
from examples.common.runtime import ScalarLog, resolve_device, write_json_atomic
from examples.common.sections import ParallelConfig, TrainConfig

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
RESULTS_FILE = "results.json"

# Loop-length, output and runtime knobs may change on resume; everything that shapes the math may not.
RESUMABLE_TRAIN_KEYS = ("epochs", "max_steps", "checkpoint_every_steps", "num_threads", "early_stop_patience", "device")
# The [parallel] keys that change the result (the rest is layout: tp, backend, load balance, timeout).
PARALLEL_MATH_KEYS = ("grad_clip", "bf16", "table_sharding", "table_optimizer")


def dynamic_table_for_training(table: Any, tc: TrainConfig) -> Any:
    """A copy of a dynamic item table's settings whose fused optimizer follows train.lr / train.betas unless set.

    That optimizer has no weight decay, so a non-zero train.weight_decay is refused rather than silently ignored.
    """
    if tc.weight_decay:
        raise ValueError(
            "model.item_table='dynamic' trains the item table with a fused optimizer that has no weight decay; "
            f"set train.weight_decay=0 (got {tc.weight_decay}) or use the static item table"
        )
    table = dataclasses.replace(table)
    if table.lr is None:
        table.lr = tc.lr
        table.beta1, table.beta2 = tc.betas
    return table


class EpochTrainer:
    """Checkpointed epoch loop over ``self.sampler`` (an ``EpochBatchSampler``) for ``self.model``.

    ``<output.dir>/last.pt`` holds model, optimizer, RNG states, loop position and a config fingerprint after every
    epoch (and every ``checkpoint_every_steps``); resuming from it reproduces an uninterrupted run exactly because
    the batch order is a pure function of (seed, epoch) and every random draw comes from the checkpointed RNG.

    A subclass calls ``__init__`` first (seeds, device), builds data, ``model``, ``optimizer`` and ``sampler``,
    then ``_start``; it implements the hooks below.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    sampler: Any
    # False on every rank of a distributed run but rank 0: that one alone shows progress and writes outputs.
    is_main: bool = True

    def __init__(self, config: Any, log: logging.Logger) -> None:
        self.config = config
        self.log = log
        self.out_dir = Path(config.output.dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tc = config.train
        if tc.num_threads > 0:
            torch.set_num_threads(tc.num_threads)
        self.device = resolve_device(tc.device)
        seed_everything(tc.seed)

    def _start(self, resume: bool, counters: Iterable[str]) -> None:
        """Fresh loop state (``counters``: throughput totals of this trainer), or the checkpointed one."""
        self.state: dict[str, Any] = {
            "epoch": 0,  # epoch in progress (or next to start)
            "batch_in_epoch": 0,  # batches of that epoch already trained
            "global_step": 0,
            "best_metric": float("-inf"),
            "best_epoch": -1,
            "evals_since_best": 0,
            "val_history": [],
            "train_wall_s": 0.0,
            **{name: 0 for name in counters},
            "epoch_loss_sum": 0.0,  # running sum over the epoch in progress (checkpointed for exact resume)
            "epoch_batches": 0,
            "train_loss_history": [],  # mean training loss of every finished epoch
            "finished": False,
        }
        if resume:
            self._resume()
        self.scalars = ScalarLog(self.out_dir, self.config.output.tensorboard and self.is_main)

    # ---------------------------------------------------------------- hooks
    def _train_loader(self) -> Iterable[Any]:
        """Training batches of the current sampler position."""
        raise NotImplementedError

    def _train_loss(self, batch: Any) -> torch.Tensor:
        """Loss of one batch already on ``self.device``; also adds to this trainer's counters in ``self.state``."""
        raise NotImplementedError

    def evaluate(self, stage: str) -> dict[str, float]:
        raise NotImplementedError

    def _valid_note(self, metrics: dict[str, float]) -> str:
        """Extra text for the per-validation log line."""
        return ""

    def _results_head(self) -> dict[str, Any]:
        """The first results.json keys: what was trained on what."""
        raise NotImplementedError

    def _results_rates(self, wall: float) -> dict[str, Any]:
        """Throughput (and other run facts) placed after ``wall_s`` in results.json."""
        raise NotImplementedError

    # ---------------------------------------------------------------- checkpoints
    def _config_fingerprint(self) -> dict[str, Any]:
        cfg = to_dict(self.config)
        for key in RESUMABLE_TRAIN_KEYS:
            cfg["train"].pop(key)
        cfg.pop("output")
        if "parallel" in cfg:  # the layout may change on resume (checkpoints re-shard); clipping and bf16 may not
            math = {key: cfg["parallel"][key] for key in PARALLEL_MATH_KEYS}
            defaults = {key: getattr(ParallelConfig, key) for key in PARALLEL_MATH_KEYS}
            cfg["parallel"] = math
            if math == defaults:  # so checkpoints of runs from before the section existed still resume
                cfg.pop("parallel")
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

    def _save_best(self, epoch: int) -> None:
        save_checkpoint(self.out_dir / BEST_CHECKPOINT, {"model": self.model.state_dict(), "epoch": epoch})

    def _load_best(self) -> None:
        self.model.load_state_dict(load_checkpoint(self.out_dir / BEST_CHECKPOINT)["model"])

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
        self.log.info("resumed from %s at epoch %d, batch %d", path, self.state["epoch"], self.state["batch_in_epoch"])

    # ---------------------------------------------------------------- loop
    def _train_step(self, batch: Any) -> float:
        """One optimizer step on a host batch; returns the batch's loss (what the log and TensorBoard show)."""
        pc = self.config.parallel
        batch = batch.to(self.device)
        if pc.bf16:
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss = self._train_loss(batch)
        else:
            loss = self._train_loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if pc.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), pc.grad_clip)
        self.optimizer.step()
        return float(loss.detach())

    def _train_epoch(self, epoch: int) -> bool:
        """Trains the rest of ``epoch``; returns False when ``max_steps`` stopped it midway."""
        tc, st = self.config.train, self.state
        self.model.train()
        self.sampler.set_epoch(epoch, st["batch_in_epoch"])
        bar = tqdm(
            self._train_loader(),
            total=len(self.sampler) - self.sampler.start_batch,
            desc=f"epoch {epoch}",
            disable=not (self.config.output.progress and self.is_main),
            leave=False,
        )
        t_start = time.perf_counter()
        for batch in bar:
            value = self._train_step(batch)

            st["global_step"] += 1
            st["batch_in_epoch"] += 1
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
        """Validates after ``epoch``, keeps the best checkpoint; returns True when early stopping triggers."""
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
            self._save_best(epoch)
        else:
            st["evals_since_best"] += 1
        self.log.info(
            "epoch %d valid %s=%.4f%s%s",
            epoch,
            tc.select_metric,
            score,
            self._valid_note(metrics),
            " (best)" if improved else "",
        )
        return bool(tc.early_stop_patience and st["evals_since_best"] >= tc.early_stop_patience)

    def fit(self) -> dict[str, Any]:
        """Trains to ``train.epochs`` (or early stop / ``max_steps``); returns what it writes to results.json."""
        tc, st = self.config.train, self.state
        show = self.config.output.progress and self.is_main
        bar = tqdm(range(st["epoch"], tc.epochs), desc="train", disable=not show, unit="epoch")
        for epoch in bar:
            if st["finished"]:
                break
            if not self._train_epoch(epoch):
                self._save_last()
                self.log.info("stopped after max_steps=%d (global step %d)", tc.max_steps, st["global_step"])
                return {"stopped_at_step": st["global_step"]}
            done = epoch + 1
            stop = self._validate(done) if done % tc.eval_every == 0 or done == tc.epochs else False
            if stop:
                st["finished"] = True
                self.log.info("early stop: %d validations without improvement", tc.early_stop_patience)
            self._save_last()
            if stop:
                break
        return self._finish()

    def _finish(self) -> dict[str, Any]:
        st = self.state
        if st["best_epoch"] < 0:  # no validation ran (e.g. epochs already reached): validate now
            self._validate(st["epoch"])
        self._load_best()
        wall = st["train_wall_s"]
        results = {
            **self._results_head(),
            "val": self.evaluate("valid"),
            "test": self.evaluate("test"),
            "best_epoch": st["best_epoch"],
            "epochs": st["epoch"],
            "global_steps": st["global_step"],
            "wall_s": round(wall, 2),
            **self._results_rates(wall),
            "val_history": st["val_history"],
            "train_loss_history": st["train_loss_history"],
            "config": to_dict(self.config),
            "torch": torch.__version__,
            "device": str(self.device),
        }
        path = self.out_dir / RESULTS_FILE
        if self.is_main:
            write_json_atomic(path, results)
        for name, value in results["test"].items():
            self.scalars.scalar(f"test/{name}", value, st["epoch"])
        self.scalars.close()
        self.log.info("test %s -> %s", {k: round(v, 4) for k, v in results["test"].items()}, path)
        return results
