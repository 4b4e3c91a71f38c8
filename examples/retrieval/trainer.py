"""RetrievalTrainer: data -> model -> sampled-softmax training with validation, checkpoints and exact resume."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchrec import KeyedJaggedTensor

from examples.common.distributed import StepPlan, all_gather_uneven
from examples.common.parallel_trainer import ParallelEpochTrainer
from examples.common.trainer import dynamic_table_for_training
from examples.retrieval.config import DataConfig, RetrievalExperimentConfig
from gr_models.data.batching import (
    EpochBatchSampler,
    NextItemEvalDataset,
    NextItemTrainDataset,
    SequenceBatch,
    collate_sequences,
    make_dataloader,
)
from gr_models.data.interactions import InteractionLog
from gr_models.data.movielens import load_movielens
from gr_models.data.sequences import build_user_sequences, leave_one_out_split
from gr_models.data.synthetic import generate_synthetic
from gr_models.jagged import last_in_sequence
from gr_models.modules.input_embedding import DynamicItemTableConfig
from gr_models.retrieval import RankingMetrics, RetrievalModelConfig, SampledSoftmaxLoss, evaluate_retrieval
from gr_models.retrieval.evaluation import target_ranks
from gr_models.retrieval.model import RetrievalModel

log = logging.getLogger("examples.retrieval")


def load_interactions(cfg: DataConfig) -> InteractionLog:
    if cfg.dataset == "synthetic":
        return generate_synthetic(cfg.synthetic)
    return load_movielens(cfg.dataset, cfg.data_dir, download=cfg.download)


def train_lengths(dataset: NextItemTrainDataset) -> np.ndarray:
    """Tokens (= target positions) of every training example, as the model sees it after truncation."""
    return np.minimum(dataset.sequences.lengths[dataset.positions] - 1, dataset.max_seq_len)


class GlobalBatchSampledSoftmax(SampledSoftmaxLoss):
    """Sampled softmax whose negatives, on a data-parallel rank, are the rows of this rank's positions in the draw a
    single process makes for the whole global batch (``plan``; None: an ordinary draw). Every rank draws the same
    ``[global positions, K]`` from the same RNG state (``draw_ids``), so a DP run trains with the single-process
    negatives;
    ``in_batch`` negatives come from the global batch's targets (gathered over the DP group).

    That draw (``sample_negatives``: the global RNG, inside the loss) serves the step of a table the dense optimizer
    trains; a fused table's one-lookup step draws beforehand with ``draw_step_negatives``."""

    plan: StepPlan | None = None
    dp_group: Any = None

    def sample_negatives(self, targets: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        if plan is None:
            return super().sample_negatives(targets)
        rows = torch.from_numpy(plan.token_rows()).to(targets.device)
        if rows.numel() != targets.numel():
            raise RuntimeError(
                f"data-parallel batch has {targets.numel()} target positions but its plan says {rows.numel()}: the "
                "sampler's lengths do not match the collated batches"
            )
        shape = (plan.global_tokens, self.num_negatives)
        if self.negatives == "uniform":
            return self.draw_ids(self.num_items, shape, targets.device)[rows]
        everyone = all_gather_uneven(targets, self.dp_group) if len(plan.parts) > 1 else [targets]
        global_targets = targets.new_empty(plan.global_tokens)
        for r, part in enumerate(everyone):
            global_targets[torch.from_numpy(plan.token_rows(r)).to(targets.device)] = part
        return global_targets[self.draw_ids(plan.global_tokens, shape, targets.device)][rows]

    def draw_step_negatives(
        self,
        targets: torch.Tensor,
        plan: StepPlan | None,
        generator: torch.Generator,
        global_targets: Callable[[], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The negatives of a one-lookup step (``OneLookupBatch``), drawn on the host before the step.

        Returns ``(ids [N, K], positions)``. The draw is the same ``[T, K]`` for the whole global batch on every rank
        (``T``: its tokens in single-process order; ``plan`` None: this batch is the global batch), from
        ``generator``, and this rank keeps its rows (``plan.token_rows()``): uniform ids ``randint(num_items)``,
        in-batch ones ``global_targets()[randint(T)]`` (``global_targets``: the global batch's target ids, in that
        order). So for the same global batch and generator seed every DP layout trains the very negatives one
        process trains (exception: a last global batch with fewer sequences than DP ranks, which the sampler pads).
        ``positions``: where in-batch negatives are all this batch's own targets (one DP rank), the ``[N, K]`` rows
        of ``targets`` they are, so their embeddings are gathered from the targets' instead of looked up; else
        None."""
        n, k = targets.numel(), self.num_negatives
        whole = plan is None or len(plan.parts) == 1
        total = n if plan is None else plan.global_tokens
        rows = None if whole else torch.from_numpy(plan.token_rows())  # type: ignore[union-attr]
        planned = total if rows is None else rows.numel()
        if planned != n:
            raise RuntimeError(
                f"data-parallel batch has {n} target positions but its plan says {planned}: the sampler's lengths do "
                "not match the collated batches"
            )
        if self.negatives == "uniform":
            ids = torch.randint(self.num_items, (total, k), generator=generator)
            return (ids if rows is None else ids[rows]), None
        positions = torch.randint(total, (total, k), generator=generator)
        if rows is None:
            return targets[positions], positions
        everyone = global_targets()
        if everyone.shape != (total,) or not torch.equal(everyone[rows], targets):
            raise RuntimeError("the global batch's targets do not hold this rank's targets at its plan's token rows")
        return everyone[positions[rows]], None


class DrawnInBatchSoftmax(SampledSoftmaxLoss):
    """gr-models' in-batch sampled softmax (negatives gathered from the targets' embeddings by position, never as
    ``[N, K, D]`` rows) at ``positions`` drawn before the step instead of from the global RNG."""

    positions: torch.Tensor | None = None

    def sample_negative_positions(self, targets: torch.Tensor) -> torch.Tensor:
        if self.positions is None or self.positions.shape != (targets.numel(), self.num_negatives):
            raise RuntimeError("DrawnInBatchSoftmax needs positions [N, K] drawn for this batch before the loss")
        return self.positions


@dataclass
class OneLookupBatch:
    """A training batch prepared for the one-lookup step of a fused item table: its negatives drawn and the one KJT
    the step looks up built on the host, so ``TrainPipeline`` (whose default ``sparse_features`` hands ``features``
    to the model's one sharded table) can start that lookup's input dist before the step."""

    batch: SequenceBatch
    features: KeyedJaggedTensor  # training_features(batch, distinct): inputs, targets, then any negatives
    negatives: torch.Tensor | None = None  # [N, K] negative ids looked up with the step (None: in-batch by position)
    distinct: torch.Tensor | None = None  # [N, C] what is looked up for them (distinct_negatives)
    index: torch.Tensor | None = None  # [N, K] where each negative's row is among the rows looked up for distinct
    positions: torch.Tensor | None = None  # [N, K] rows of the batch's targets the negatives are (not looked up)

    def _map(self, fn: Callable[[Any], Any]) -> OneLookupBatch:
        def optional(x: Any) -> Any:
            return None if x is None else fn(x)

        return OneLookupBatch(
            fn(self.batch),
            fn(self.features),
            *(optional(x) for x in (self.negatives, self.distinct, self.index, self.positions)),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> OneLookupBatch:
        return self._map(lambda x: x.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> OneLookupBatch:
        """In page-locked host memory, so the train pipeline's copy to the GPU runs asynchronously."""
        return self._map(lambda x: x.pin_memory())


def distinct_negatives(negatives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(distinct [N, C], index [N, K])`` for looking ``negatives`` (``[N, K]`` ids) up with the step: each distinct
    id once (then the distinct ids again, in order, to fill the ``[N, C]`` shape ``training_forward`` takes; the
    repeats get no gradient), and ``index`` such that ``distinct.flatten()[index] == negatives``.

    K draws per position from a catalogue of a few thousand items repeat most ids many times: the table then looks up
    (and, sharded, sends over the all-to-alls) each id once, not once per draw (CPU, synthetic default, dynamic table:
    1.8 s -> 0.77 s per step), with the same embeddings and gradients up to summation order."""
    ids, index = torch.unique(negatives, return_inverse=True)
    n = negatives.size(0)
    cols = -(-ids.numel() // n)
    return ids[torch.arange(n * cols) % ids.numel()].view(n, cols), index


# Mixed into the seed of a one-lookup step's negatives, so that stream differs from other draws seeded by train.seed.
NEGATIVES_STREAM = 0x4E454753


def step_generator(seed: int, epoch: int, batch: int) -> torch.Generator:
    """Where a one-lookup step's negatives come from: a pure function of (train.seed, epoch, batch within epoch), so
    the draw is the same whenever the batch is prepared (the train pipeline prepares batch i+1 before step i), after
    a resume, and at any world size; the global RNG (dropout) sees the plain loop's sequence of draws. It is another
    stream than the dense-optimizer step's (the global RNG): the same seed gives other negatives there."""
    state = np.random.SeedSequence([seed, NEGATIVES_STREAM, epoch, batch]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


class RetrievalTrainer(ParallelEpochTrainer):
    """Trains a next-item retrieval model as configured; ``fit()`` returns the results written to results.json.

    The loop state (epoch, batch within epoch, RNG states, optimizer, best validation) is checkpointed to
    ``<output.dir>/last.pt`` after every epoch (and every ``checkpoint_every_steps``); ``resume=True`` continues
    from there and reproduces an uninterrupted run exactly: the batch order is a pure function of (seed, epoch)
    and every random draw (dropout, negatives) comes from the checkpointed torch RNG, except a fused table's
    negatives, which come from a generator seeded by the batch's place (``step_generator``).

    An item table trained by a fused optimizer (``model.item_table="dynamic"``, or sharded over the ranks) is
    looked up once per training step (``RetrievalModel.training_forward`` on a ``OneLookupBatch``), so it takes
    one optimizer step per training step; a table the dense optimizer trains keeps the three-call step.

    Under torchrun (or with ``parallel.tp > 1``) it trains the same global batches data/tensor parallel (see
    ``examples.common.parallel_trainer``).
    """

    def __init__(self, config: RetrievalExperimentConfig, *, resume: bool = False) -> None:
        mc = config.model
        super().__init__(config, log, num_heads=mc.hstu.num_heads if mc.encoder == "hstu" else None, encoder=mc.encoder)
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
        self.sampler = self._train_sampler(
            len(self.train_set), lambda: train_lengths(self.train_set), config.model.embedding_dim
        )

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
        self.model = self._parallelize(RetrievalModel(model_cfg).to(self.device))
        self.loss_fn = GlobalBatchSampledSoftmax(self.num_items, tc.num_negatives, tc.temperature, tc.negatives)
        self.in_batch_loss = DrawnInBatchSoftmax(self.num_items, tc.num_negatives, tc.temperature, "in_batch")
        if self.distributed:
            self.loss_fn.dp_group = self.ctx.dp_group
        self.optimizer = self._optimizer(self.model)
        # A fused item table (gr-dynemb, or sharded over the ranks) takes one optimizer step per lookup call, so its
        # training step looks the table up ONCE (inputs, targets, negatives drawn beforehand: OneLookupBatch). A
        # table the dense optimizer trains (one process with a static table, or replicated: data_parallel) keeps the
        # step of three calls: its gradients add up into one dense step anyway, and that step's draws (negatives
        # from the global RNG after the forward) are what the results in docs/results were trained with.
        self.one_lookup = mc.item_table == "dynamic" or self._has_sharded_tables()
        self.pipeline = self._make_pipeline(enabled=True)  # OneLookupBatch.features feeds the table's input dist
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
        if not self.distributed:
            return evaluate_retrieval(
                self.model, self._eval_loader(dataset), device=self.device, metrics=RankingMetrics()
            )
        return self._evaluate_sharded(dataset)

    @torch.no_grad()
    def _evaluate_sharded(self, dataset: NextItemEvalDataset) -> dict[str, float]:
        """``evaluate_retrieval`` over this DP rank's shard; the targets' ranks are gathered in dataset order and
        scored once, so every rank returns the metrics a single process computes from the same ranks."""
        batches, valid = self._eval_shard(len(dataset))
        # A private generator: a DataLoader draws its base seed from it, not from the global RNG (exact resume).
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_sequences, generator=torch.Generator())
        was_training = self.model.training
        self.model.eval()
        try:
            items = self.model.all_item_embeddings()  # a lookup of every item: all ranks take part
            ranks = []
            for batch, n in zip(loader, valid, strict=True):
                batch = batch.to(self.device)
                queries = last_in_sequence(self.model(batch), batch.seq_offsets)
                r = target_ranks(queries @ items.T, batch.target_items, batch.history_offsets, batch.history_items)
                ranks.append(r[:n])
        finally:
            self.model.train(was_training)
        metrics = RankingMetrics()
        metrics.update(self._gather_rows(torch.cat(ranks)))
        return metrics.compute()

    def _train_loader(self) -> Any:
        loader: Iterable[Any] = make_dataloader(self.train_set, self.sampler)
        if self.one_lookup:
            loader = self._one_lookup_batches(loader)
        return self._distributed_batches(loader)

    def _one_lookup_batches(self, loader: Iterable[SequenceBatch]) -> Iterator[OneLookupBatch]:
        """The loader's batches with their negatives drawn (``step_generator`` of the batch's place in the epoch)
        and their one KJT built."""
        tc, sampler = self.config.train, self.sampler
        epoch = sampler.epoch
        for b, batch in enumerate(loader, start=sampler.start_batch):
            # The sampler's plan is the batch's just served (the DataLoader reads the sampler in this process).
            plan = sampler.plan if self.distributed else None
            negatives, positions = self.loss_fn.draw_step_negatives(
                batch.target_items, plan, step_generator(tc.seed, epoch, b), lambda p=plan: self._global_targets(p)
            )
            if positions is not None:  # rows of the targets: not looked up (the loss gathers them by position)
                ob = OneLookupBatch(batch, self.model.training_features(batch), positions=positions)
            else:
                distinct, index = distinct_negatives(negatives)
                features = self.model.training_features(batch, distinct)
                ob = OneLookupBatch(batch, features, negatives=negatives, distinct=distinct, index=index)
            yield ob.pin_memory() if self.device.type == "cuda" else ob

    def _global_targets(self, plan: StepPlan) -> torch.Tensor:
        """The target ids of a global batch in single-process token order (its sequences' targets concatenated)."""
        return torch.from_numpy(np.concatenate([self.train_set[int(i)].target_items for i in plan.global_indices]))

    def _loss_count(self, batch: Any) -> int:
        return int(_sequences(batch).target_items.numel())

    def _train_step(self, batch: Any) -> float:
        value = super()._train_step(batch)
        self.loss_fn.plan = None
        return value

    def _train_loss(self, batch: Any) -> torch.Tensor:
        if isinstance(batch, OneLookupBatch):
            loss = self._one_lookup_loss(batch)
            batch = batch.batch
        else:  # the dense-optimizer step: the table looked up three times (inputs, targets, negatives)
            self.loss_fn.plan = getattr(self, "plan", None) if self.distributed else None
            queries = self.model(batch)
            loss = self.loss_fn(queries, batch.target_items, self.model.item_embeddings)
        self.state["train_sequences"] += len(batch)
        self.state["train_tokens"] += int(batch.target_items.numel())
        return loss

    def _one_lookup_loss(self, ob: OneLookupBatch) -> torch.Tensor:
        """The loss from ONE call of the item table: a fused table optimizer steps once per training step."""
        if ob.negatives is not None:
            emb = self.model.training_forward(ob.batch, ob.features, ob.distinct)
            rows = emb.negatives.flatten(0, 1)  # type: ignore[union-attr]
            return self.loss_fn(
                emb.queries,
                ob.batch.target_items,
                target_embeddings=emb.targets,
                negatives=ob.negatives,
                negative_embeddings=rows[ob.index],
            )
        # In-batch negatives of one rank are rows of the targets' embeddings: gathered there, not looked up.
        emb = self.model.training_forward(ob.batch, ob.features)
        self.in_batch_loss.positions = ob.positions
        try:
            return self.in_batch_loss(emb.queries, ob.batch.target_items, target_embeddings=emb.targets)
        finally:
            self.in_batch_loss.positions = None

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


def _sequences(batch: Any) -> SequenceBatch:
    return batch.batch if isinstance(batch, OneLookupBatch) else batch
