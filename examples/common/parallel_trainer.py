"""The epoch loop of ``examples.common.trainer`` on one process or under torchrun (gloo or NCCL), one code path.

A trainer derived from ``ParallelEpochTrainer`` runs exactly like an ``EpochTrainer`` in a single process with
``parallel.tp = 1``. Launched by torchrun (``WORLD_SIZE > 1``) or with ``parallel.tp > 1`` it:

- initialises gr-parallel (``world = tp * dp``; consecutive ranks form a tensor-parallel group);
- trains the same global batches as a single process: each of ``train.batch_size`` sequences is split over the
  ``dp`` data-parallel ranks (``DataParallelBatchSampler``, load-balanced by sum of L^2), the ranks of a TP group
  read the same part;
- builds the model identically on every rank and hands it to ``gr_parallel.parallelize`` (TP HSTU blocks, sharded
  or replicated tables, dense gradient sync, the dense AdamW);
- divides each rank's summed loss by the global count, so the DP-summed gradients are the single-process mean's;
- evaluates a contiguous shard per DP rank (every rank takes part in every sharded lookup) and gathers the
  per-example results in dataset order, so metrics are computed from the same numbers as in one process;
- writes results.json, TensorBoard, logs and progress bars from rank 0 only, and checkpoints with
  ``gr_parallel.save_distributed`` / ``load_distributed`` (exact resume; a different world size re-shards).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from examples.common.checkpoint import rng_state, set_rng_state
from examples.common.distributed import (
    DataParallelBatchSampler,
    ParallelLayoutError,
    StepPlan,
    check_launched,
    check_layout,
    launched_world_size,
    wants_distributed,
)
from examples.common.trainer import EpochTrainer
from gr_models.data.batching import EpochBatchSampler


@dataclass(frozen=True)
class _TakenStep:
    """A step the train pipeline already took; the loop only books its loss."""

    loss: float


LAST_DIR = "last"  # distributed checkpoints are folders (one file per rank and shard), next to last.pt's place
BEST_DIR = "best"


class ParallelEpochTrainer(EpochTrainer):
    """``EpochTrainer`` that also runs distributed. A subclass calls ``__init__`` (which initialises the process
    group when needed) and builds its parts through ``_train_sampler``, ``_parallelize`` and ``_optimizer``; its
    ``_train_loss`` returns the batch's MEAN loss and ``_loss_count`` the number of terms averaged."""

    ctx: Any = None  # gr_parallel.ParallelContext when distributed
    parallel: Any = None  # gr_parallel.ParallelModel when distributed
    pipeline: Any = None  # gr_parallel.TrainPipeline when distributed with sharded tables (see _make_pipeline)

    def __init__(self, config: Any, log: logging.Logger, *, num_heads: int | None, encoder: str) -> None:
        pc = config.parallel
        self.dp_size, self.dp_rank = 1, 0
        if wants_distributed(pc):
            check_launched(pc)
            self.dp_size = check_layout(
                pc,
                launched_world_size(),
                batch_size=config.train.batch_size,
                eval_batch_size=config.train.eval_batch_size,
                num_heads=num_heads,
                encoder=encoder,
            )
            from gr_parallel.context import ParallelConfig, initialize

            backend = None if pc.backend == "auto" else pc.backend
            self.ctx = initialize(ParallelConfig(pc.tp, backend, pc.timeout_s))
            self.dp_rank = self.ctx.dp_rank
            self.is_main = self.ctx.rank == 0
            if not self.is_main:
                log.setLevel(logging.WARNING)
            if config.train.device != "auto" and torch.device(config.train.device).type != self.ctx.device.type:
                raise ParallelLayoutError(
                    f"train.device={config.train.device!r} but the {self.ctx.backend} backend runs on "
                    f"{self.ctx.device.type}; use train.device=auto or parallel.backend to match"
                )
        super().__init__(config, log)
        if self.ctx is not None:
            self.device = self.ctx.device
            log.info(
                "distributed: world %d = tp %d x dp %d, backend %s, device %s",
                self.ctx.world_size,
                self.ctx.tp_size,
                self.ctx.dp_size,
                self.ctx.backend,
                self.device,
            )

    @property
    def distributed(self) -> bool:
        return self.ctx is not None

    # ---------------------------------------------------------------- building
    def _train_sampler(self, num_examples: int, lengths: Callable[[], np.ndarray], width: int) -> Any:
        """The training batches: gr-models' ``EpochBatchSampler`` in one process; this DP rank's part of the same
        global batches when distributed (``lengths()``: tokens per example; ``width``: the HSTU width, which weighs
        the per-token against the attention cost in the load balance)."""
        tc = self.config.train
        if not self.distributed:
            return EpochBatchSampler(num_examples, tc.batch_size, shuffle=True, seed=tc.seed)
        from gr_parallel.load_balance import hstu_linear_coef

        return DataParallelBatchSampler(
            lengths(),
            tc.batch_size,
            dp_size=self.dp_size,
            dp_rank=self.dp_rank,
            seed=tc.seed,
            load_balance=self.config.parallel.load_balance,
            linear_coef=hstu_linear_coef(width),
        )

    def _table_sharding(self) -> str:
        chosen = self.config.parallel.table_sharding
        if chosen == "auto":
            return "model_parallel" if self.device.type == "cuda" else "data_parallel"
        return chosen

    def _parallelize(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` itself in one process; distributed, the model inside ``gr_parallel.parallelize`` (kept in
        ``self.parallel``), whose methods (``item_embeddings``, ``config``...) the trainer keeps calling."""
        if not self.distributed:
            return model
        from torchrec.distributed.planner import ParameterConstraints

        # Submodules by name: ``gr_parallel.parallelize`` is both a module and the function it defines.
        from gr_parallel.dense import DenseOptimizerConfig
        from gr_parallel.parallelize import EmbeddingOptimizerConfig, ParallelizeConfig, parallelize
        from gr_parallel.sparse import embedding_tables

        tc, pc = self.config.train, self.config.parallel
        sharding = self._table_sharding()
        static = [name for name, (_, kind) in embedding_tables(model).items() if kind == "static"]
        constraints = {}
        if sharding == "data_parallel":
            constraints = {name: ParameterConstraints(sharding_types=["data_parallel"]) for name in static}
        elif static:
            if tc.weight_decay:
                raise ParallelLayoutError(
                    "parallel.table_sharding=model_parallel trains the tables with a fused optimizer that has no "
                    f"weight decay; set train.weight_decay=0 (got {tc.weight_decay}) or table_sharding=data_parallel"
                )
            if pc.table_optimizer == "adam" and self.device.type != "cuda":
                raise ParallelLayoutError(
                    "parallel.table_optimizer=adam needs CUDA for model-parallel tables (FBGEMM's CPU kernel has no "
                    "Adam); on the CPU use parallel.table_sharding=data_parallel or another table_optimizer"
                )
        beta1, beta2 = tc.betas
        config = ParallelizeConfig(
            constraints=constraints,
            embedding_optimizer=EmbeddingOptimizerConfig(pc.table_optimizer, tc.lr, beta1=beta1, beta2=beta2),
            dense_optimizer=DenseOptimizerConfig(tc.lr, tc.betas, weight_decay=tc.weight_decay),
            bf16=pc.bf16,
            grad_clip=pc.grad_clip or None,
            planner_batch_size=tc.batch_size // self.dp_size,
        )
        # Building the parallel layers draws their (then overwritten) initial weights from the global RNG; the
        # random stream of training (negatives, dropout) must continue where the single-device model left it.
        rng = rng_state()
        self.parallel = parallelize(model, self.ctx, config)
        set_rng_state(rng)
        return self.parallel.module

    def _optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """AdamW over every parameter in one process; distributed, the dense AdamW ``parallelize`` built (tables
        sharded over the world train inside backward)."""
        if self.distributed:
            return self.parallel.optimizer
        tc = self.config.train
        return torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)

    # ---------------------------------------------------------------- hooks
    def _loss_count(self, batch: Any) -> int:
        """How many terms ``_train_loss`` averaged over (the global count sums it over DP ranks)."""
        raise NotImplementedError

    def _start(self, resume: bool, counters: Any) -> None:
        self._counter_names = tuple(counters)
        super()._start(resume, self._counter_names)

    # ---------------------------------------------------------------- training step
    def _train_epoch(self, epoch: int) -> bool:
        if not self.distributed:
            return super()._train_epoch(epoch)
        self._plans: deque[StepPlan] = deque()
        try:
            return super()._train_epoch(epoch)
        finally:
            if self.pipeline is not None:  # the sharded modules get their own forwards back (evaluation)
                self.pipeline.reset()

    def _distributed_batches(self, loader: Any) -> Iterator[Any]:
        """What the loop iterates (subclasses' ``_train_loader`` returns this over their DataLoader): the batches
        themselves, each with its sampler plan queued; with the train pipeline, steps already taken by it."""
        if not self.distributed:
            yield from loader
            return

        def planned() -> Iterator[Any]:
            for batch in loader:
                self._plans.append(self.sampler.plan)
                yield batch

        if self.pipeline is None:
            yield from planned()
            return
        batches: Iterator[Any] = planned()
        max_steps = self.config.train.max_steps
        if max_steps:
            # The pipeline gets only the batches this run trains (the loop stops after the step that reaches
            # max_steps, at least one): a max_steps stop then leaves no batch prefetched (copied to the device, its
            # input all-to-alls run) only for reset() to drop it.
            batches = itertools.islice(batches, max(max_steps - self.state["global_step"], 1))
        while True:
            try:
                self.pipeline.progress(batches)  # forward/backward/step of batch i while batch i+1 travels
            except StopIteration:
                return
            yield _TakenStep(self._finish_stats())

    def _has_sharded_tables(self) -> bool:
        """Whether the model holds tables sharded over the ranks (TorchRec or gr-dynemb sharded modules). They train
        in a fused optimizer inside backward, one step per call: a training step should look each up once."""
        if not self.distributed:
            return False
        from torchrec.distributed.types import ShardedModule

        return any(isinstance(m, ShardedModule) for m in self.model.modules())

    def _make_pipeline(self, enabled: bool) -> Any:
        """``gr_parallel.TrainPipeline`` over the model's sharded tables (its input dist and copy of the next batch
        overlap this one), when ``parallel.pipeline`` and the subclass's batches allow it; otherwise None. Its
        default ``sparse_features`` prefetches ``batch.features`` for the model's one sharded module: the batches
        must carry the very KJT the forward passes to it."""
        from gr_parallel.pipeline import TrainPipeline

        if not (self.distributed and self.config.parallel.pipeline and enabled):
            return None
        if not self._has_sharded_tables():
            return None  # every table replicated: no input dist to overlap

        def before_step() -> None:
            self.parallel.sync_grads()
            if self.parallel.config.grad_clip is not None:
                self.parallel.clip_grad_norm_()

        self.log.info("train pipeline: the next batch's copy and sparse input dist overlap each step")
        return TrainPipeline(
            self.model,
            self.optimizer,
            self.device,
            forward=self._scaled_loss,
            before_step=before_step,
            zero_grad=self.parallel.zero_grad,
        )

    def _scaled_loss(self, batch: Any) -> torch.Tensor:
        """This rank's loss divided by the global count (its gradients sum over DP ranks to the global mean's)."""
        self.plan = self._plans.popleft()  # batches reach the step in the order the sampler made them
        st = self.state
        before = [st[name] for name in self._counter_names]
        with self.parallel.autocast():
            mean = self._train_loss(batch)
        local = self._loss_count(batch)
        # One DP all-reduce carries the global count (what gr_parallel.global_count sums), the summed loss for the
        # log, and the throughput counters' increments; built on the device, so nothing waits for the forward.
        increments = [st[name] - b for name, b in zip(self._counter_names, before, strict=True)]
        counts = torch.tensor([float(local), *increments], dtype=torch.float64, device=self.device)
        stats = torch.cat([counts[:1], (mean.detach().double() * local).reshape(1), counts[1:]])
        if self.ctx.dp_size > 1:
            dist.all_reduce(stats, group=self.ctx.dp_group)
        self._pending = (stats, before)
        return mean * (local / stats[0]).to(mean.dtype)

    def _finish_stats(self) -> float:
        """After the step: the counters become global totals; returns the global batch's mean loss."""
        stats, before = self._pending
        total, loss_sum, *summed = stats.tolist()
        for name, b, inc in zip(self._counter_names, before, summed, strict=True):
            self.state[name] = b + (round(inc) if isinstance(b, int) else inc)
        return loss_sum / total

    def _train_step(self, batch: Any) -> float:
        if not self.distributed:
            return super()._train_step(batch)
        if isinstance(batch, _TakenStep):
            return batch.loss
        loss = self._scaled_loss(batch.to(self.device))
        loss.backward()  # tables train inside backward
        self.parallel.step()  # DP gradient sync, clipping, dense AdamW, zero_grad
        return self._finish_stats()

    # ---------------------------------------------------------------- evaluation
    def _eval_shard(self, n: int) -> tuple[list[list[int]], list[int]]:
        """This DP rank's evaluation batches of a dataset of ``n`` examples and how many of each are real.

        Rank r takes the contiguous block ``[r * m, (r + 1) * m)`` (``m = ceil(n / dp)``), padded with example 0 to
        ``m`` so that every rank runs the same number of batches of ``eval_batch_size / dp``: the sharded tables'
        lookups are collectives. Gathering the blocks in rank order restores the dataset order."""
        per_rank = -(-n // self.dp_size)
        start = min(self.dp_rank * per_rank, n)
        own = list(range(start, min(start + per_rank, n)))
        indices = own + [0] * (per_rank - len(own))
        size = self.config.train.eval_batch_size // self.dp_size
        batches = [indices[i : i + size] for i in range(0, per_rank, size)]
        valid = [max(0, min(size, len(own) - i)) for i in range(0, per_rank, size)]
        return batches, valid

    def _gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's per-example results concatenated with the other DP ranks', in rank (= dataset) order."""
        if not self.distributed or self.ctx.dp_size == 1:
            return rows
        from examples.common.distributed import all_gather_uneven

        return torch.cat(all_gather_uneven(rows, self.ctx.dp_group))

    # ---------------------------------------------------------------- checkpoints
    def _save_last(self) -> None:
        if not self.distributed:
            return super()._save_last()
        from gr_parallel.checkpoint import save_distributed

        # Every rank's RNG states are saved by save_distributed itself (dropout and negatives resume exactly).
        trainer_state = {"state": self.state, "config": self._config_fingerprint()}
        save_distributed(self.out_dir / LAST_DIR, self.parallel, self.optimizer, trainer_state, self.ctx)

    def _resume(self) -> None:
        from examples.common.trainer import LAST_CHECKPOINT

        path = self.out_dir / LAST_DIR
        if not self.distributed:
            if not (self.out_dir / LAST_CHECKPOINT).is_file() and (path / "meta.json").is_file():
                raise FileNotFoundError(
                    f"--resume: {self.out_dir} holds a distributed checkpoint ({path}), not {LAST_CHECKPOINT}; resume "
                    "it under torchrun (any number of processes and --tp: it re-shards)"
                )
            return super()._resume()
        from gr_parallel.checkpoint import load_distributed

        if not (path / "meta.json").is_file():
            written_alone = (self.out_dir / LAST_CHECKPOINT).is_file()
            hint = (
                f": {self.out_dir / LAST_CHECKPOINT} was written by one process; resume it there"
                if written_alone
                else ""
            )
            raise FileNotFoundError(f"--resume given but no distributed checkpoint at {path}{hint}")
        loaded = load_distributed(path, self.parallel, self.optimizer, self.ctx)
        if loaded.trainer_state["config"] != self._config_fingerprint():
            raise ValueError(
                f"cannot resume from {path}: it was written with a different data/model/optimizer config; "
                "use a new output.dir or the same config"
            )
        self.state = loaded.trainer_state["state"]
        if not loaded.rng_restored:
            self.log.warning(
                "%s was written by %d ranks, this run has %d: tables and optimizers are re-sharded, but the random "
                "streams (dropout, negatives) start afresh, so the run is not bit-exact with an uninterrupted one",
                path,
                loaded.saved_world_size,
                self.ctx.world_size,
            )
        self.log.info("resumed from %s at epoch %d, batch %d", path, self.state["epoch"], self.state["batch_in_epoch"])

    def _save_best(self, epoch: int) -> None:
        if not self.distributed:
            return super()._save_best(epoch)
        from gr_parallel.checkpoint import save_distributed

        save_distributed(self.out_dir / BEST_DIR, self.parallel, None, {"epoch": epoch}, self.ctx)

    def _load_best(self) -> None:
        if not self.distributed:
            return super()._load_best()
        from gr_parallel.checkpoint import load_distributed

        load_distributed(self.out_dir / BEST_DIR, self.parallel, None, self.ctx)
