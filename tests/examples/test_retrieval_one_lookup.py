"""The retrieval trainer's one-lookup step for item tables trained by a fused optimizer (one step per lookup call).

- One process with a gr-dynemb table (fused Adam): the table takes exactly one optimizer step per training step, and
  training equals a hand-written reference that looks inputs, targets and negatives up in one call per step.
- One process with a static table (the dense AdamW): the step is the three-call one it always was, bit for bit
  (the results in docs/results were trained with it).
- Two ranks (gloo) with the table sharded row-wise (fused Adagrad): the train pipeline gives the plain loop's losses
  and metrics exactly (dropout on: the negatives no longer draw from the global RNG the pipeline would interleave),
  also stopped at max_steps and resumed from its distributed checkpoint; every rank calls the table once per
  training step; a dynamic table sharded over the ranks with in-batch negatives (drawn over the global batch's
  targets) trains like one process.
- GPUs (``gpu`` mark): the one-process dynamic-table test on one GPU; two GPUs over NCCL with the CUDA default (tables
  sharded, fused Adam): one table call per step, pipelined equal to the plain loop.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from examples.common.config import load_config
from examples.retrieval.config import RetrievalExperimentConfig
from examples.retrieval.trainer import RetrievalTrainer, step_generator
from gr_models.data.batching import SequenceBatch, make_dataloader
from gr_models.retrieval.losses import SampledSoftmaxLoss

STEPS = 6  # 4 batches per epoch: stops inside the second epoch


def _table_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state with a dynamic table's rows sorted by key (its storage order is not part of the result)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    keys = [k for k in state if k.endswith(".table_keys")]
    for k in keys:
        prefix = k[: -len("table_keys")]
        order = state[k].argsort()
        for name in [n for n in state if n.startswith(prefix) and state[n].shape[:1] == state[k].shape]:
            state[name] = state[name][order]
    return state


def _one_lookup_reference(trainer: RetrievalTrainer, steps: int) -> list[float]:
    """``steps`` training steps of ``trainer``'s freshly built model, optimizer and batches, written out: per step ONE
    ``training_forward`` call looking the inputs, the targets and the negatives (ids, also in-batch ones) up, the
    negatives drawn from ``step_generator`` of the batch's place, gr-models' plain ``SampledSoftmaxLoss``."""
    tc = trainer.config.train
    loss_fn = SampledSoftmaxLoss(trainer.num_items, tc.num_negatives, tc.temperature, tc.negatives)
    model, optimizer, sampler = trainer.model, trainer.optimizer, trainer.sampler
    model.train()
    losses: list[float] = []
    epoch = 0
    while len(losses) < steps:
        sampler.set_epoch(epoch)
        for b, batch in enumerate(make_dataloader(trainer.train_set, sampler)):
            if len(losses) == steps:
                break
            batch = batch.to(trainer.device)
            targets = batch.target_items
            shape = (targets.numel(), tc.num_negatives)
            g = step_generator(tc.seed, epoch, b)
            if tc.negatives == "uniform":
                negatives = torch.randint(trainer.num_items, shape, generator=g).to(trainer.device)
            else:
                negatives = targets[torch.randint(targets.numel(), shape, generator=g).to(trainer.device)]
            emb = model.training_forward(batch, None, negatives)
            loss = loss_fn(
                emb.queries,
                targets,
                target_embeddings=emb.targets,
                negatives=negatives,
                negative_embeddings=emb.negatives,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        epoch += 1
    return losses


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("negatives", ["uniform", "in_batch"])
def test_dynamic_table_steps_once_per_training_step_like_a_one_lookup_reference(
    negatives: str, device: str, tmp_path: Path, retrieval_config: Callable[..., RetrievalExperimentConfig]
) -> None:
    extra = ('model.item_table="dynamic"', "train.epochs=2", f'train.negatives="{negatives}"', f"train.device={device}")
    trainer = RetrievalTrainer(retrieval_config(tmp_path / "run", *extra, f"train.max_steps={STEPS}"))
    assert trainer.one_lookup
    collection = trainer.model.input_embedding.item_embeddings
    table = collection.table("item_table")
    calls: list[bool] = []
    collection.register_forward_hook(lambda module, *_: calls.append(module.training))
    assert trainer.fit() == {"stopped_at_step": STEPS}
    # Adam's t: one step per training step (the three-call step took three), one table call per step while training.
    assert table.step == STEPS and sum(calls) == STEPS

    reference = RetrievalTrainer(retrieval_config(tmp_path / "ref", *extra))
    ref_losses = _one_lookup_reference(reference, STEPS)
    assert reference.model.input_embedding.item_embeddings.table("item_table").step == STEPS
    loss_tol = 1e-6 if device == "cpu" else 1e-4
    assert trainer.state["train_loss_history"] == [pytest.approx(sum(ref_losses[:4]) / 4, abs=loss_tol)]
    assert trainer.state["epoch_loss_sum"] == pytest.approx(sum(ref_losses[4:]), abs=loss_tol)
    got, want = _table_state(trainer.model), _table_state(reference.model)
    assert got.keys() == want.keys() and any(k.endswith("table_values") for k in got)
    # The trainer looks each distinct negative id up once (uniform) or gathers in-batch negatives from the targets'
    # rows, where the reference looks up every drawn id: the same rows, gradients summed in another order (float
    # rounding); CUDA kernels may sum in any order.
    tol = 1e-4 if device == "cuda" else 1e-5
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=tol, msg=k)


class _ThreeCallStep(RetrievalTrainer):
    """The retrieval training step as written before the one-lookup step (commit 5ef3b5a), for one process."""

    def _train_loss(self, batch: Any) -> torch.Tensor:
        queries = self.model(batch)
        loss = self.loss_fn(queries, batch.target_items, self.model.item_embeddings)
        self.state["train_sequences"] += len(batch)
        self.state["train_tokens"] += int(batch.target_items.numel())
        return loss


@pytest.mark.parametrize("negatives", ["uniform", "in_batch"])
def test_static_table_step_is_unchanged(
    negatives: str, tmp_path: Path, retrieval_config: Callable[..., RetrievalExperimentConfig]
) -> None:
    extra = ("train.epochs=2", f'train.negatives="{negatives}"', "train.device=cpu")
    trainer = RetrievalTrainer(retrieval_config(tmp_path / "now", *extra))
    assert not trainer.one_lookup
    trainer.sampler.set_epoch(0)
    assert all(type(b) is SequenceBatch for b in trainer._train_loader())
    calls: list[bool] = []
    trainer.model.input_embedding.item_embeddings.register_forward_hook(lambda m, *_: calls.append(m.training))
    results = trainer.fit()
    before = _ThreeCallStep(retrieval_config(tmp_path / "before", *extra)).fit()
    # Per training step: the inputs, the targets, then every item (this small catalogue's negatives are scored
    # against all items; in-batch ones too, as the trainer's loss draws them itself).
    assert sum(calls) == 3 * results["global_steps"] == 3 * 8
    for key in ("train_loss_history", "val_history", "test", "global_steps"):
        assert results[key] == before[key], key  # exactly: same draws, same ops
    now, was = (torch.load(tmp_path / d / "last.pt", weights_only=False)["model"] for d in ("now", "before"))
    for k in was:
        torch.testing.assert_close(now[k], was[k], rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------------------------------------- two ranks (gloo)
TINY = [
    "data.synthetic.num_users=120",
    "data.synthetic.num_items=80",
    "data.synthetic.num_topics=4",
    "data.synthetic.max_seq_len=30",
    "model.embedding_dim=16",
    "model.max_seq_len=20",
    "model.hstu.num_heads=2",
    "train.batch_size=32",
    "train.num_negatives=16",
    "train.eval_every=1",
    "train.epochs=2",
    'train.negatives="in_batch"',
    "output.progress=false",
    "output.tensorboard=true",
]
SHARDED = ["parallel.table_sharding=model_parallel", "parallel.table_optimizer=adagrad", "model.dropout=0.2"]
DYNAMIC = ["model.item_table=dynamic", "model.dropout=0.0", "parallel.pipeline=true"]
STOP_AT = 5  # the "resumed" run stops after this step (inside epoch 2) and resumes to the end
RUNS = {
    "cpu": {
        "plain": [*SHARDED, "parallel.pipeline=false"],
        "piped": [*SHARDED, "parallel.pipeline=true"],
        "resumed": [*SHARDED, "parallel.pipeline=true"],
        "dynamic": DYNAMIC,
    },
    # CUDA: the default layout (tables sharded over the GPUs, fused Adam; NCCL), copies and all-to-alls on streams.
    "gpu": {
        "plain": ["model.dropout=0.2", "parallel.pipeline=false", "output.tensorboard=false"],
        "piped": ["model.dropout=0.2", "parallel.pipeline=true", "output.tensorboard=false"],
    },
}


def _counted_fit(trainer: RetrievalTrainer) -> tuple[dict[str, Any], int]:
    """``trainer.fit()`` and how often the item table was called while training."""
    table = trainer.model.input_embedding.item_embeddings
    calls = [0]
    compute = table.compute_and_output_dist  # every call of a sharded module, prefetched by the pipeline or not

    def counted(*args: Any) -> Any:
        calls[0] += table.training
        return compute(*args)

    table.compute_and_output_dist = counted
    return trainer.fit(), calls[0]


def _rank_worker(out: Path, kind: str) -> None:
    """What each rank of the launch runs: ``RUNS[kind]``, counting the item table's calls while training."""
    import torch.distributed as dist

    for name, extra in RUNS[kind].items():
        overrides = [*TINY, *extra, f'output.dir="{out / name}"']
        calls = 0
        if name == "resumed":
            cfg = load_config(RetrievalExperimentConfig, None, [*overrides, f"train.max_steps={STOP_AT}"])
            _, calls = _counted_fit(RetrievalTrainer(cfg))
        cfg = load_config(RetrievalExperimentConfig, None, overrides)
        trainer = RetrievalTrainer(cfg, resume=name == "resumed")
        results, more = _counted_fit(trainer)
        info = {"train_calls": calls + more, "global_steps": results["global_steps"], "one": trainer.one_lookup}
        (out / name / f"calls{dist.get_rank()}.json").write_text(json.dumps({**info, "device": results["device"]}))


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.examples.test_torchrun import torchrun

    out = tmp_path_factory.mktemp("one_lookup")
    torchrun(__file__, 2, [], str(out), "cpu")
    return out


def _check_calls(out: Path, runs: dict[str, list[str]]) -> None:
    for name in runs:
        for rank in (0, 1):
            calls = json.loads((out / name / f"calls{rank}.json").read_text())
            assert calls["one"] and calls["train_calls"] == calls["global_steps"] == 8, (name, rank, calls)


def test_sharded_table_steps_once_per_step_and_the_pipeline_equals_the_plain_loop(two_rank_runs: Path) -> None:
    """Dropout on: the pipeline prepares batch i+1 (its negatives drawn) before step i; the plain loop after. A
    pipelined run stopped after step 5 and resumed from its distributed checkpoint trains the same."""
    from tests.examples.test_torchrun import step_losses

    out = two_rank_runs
    _check_calls(out, RUNS["cpu"])
    plain, piped, resumed = (json.loads((out / n / "results.json").read_text()) for n in ("plain", "piped", "resumed"))
    assert step_losses(out / "piped") == step_losses(out / "plain") == step_losses(out / "resumed")
    for run in (piped, resumed):
        assert run["test"] == plain["test"] and run["val_history"] == plain["val_history"]
    assert plain["train_loss_history"][-1] < plain["train_loss_history"][0]


def test_dynamic_table_sharded_with_in_batch_negatives_trains_like_one_process(
    two_rank_runs: Path, tmp_path: Path
) -> None:
    from tests.examples.test_torchrun import step_losses

    cfg = load_config(RetrievalExperimentConfig, None, [*TINY, *DYNAMIC, f'output.dir="{tmp_path}"'])
    reference = RetrievalTrainer(cfg).fit()
    ref_losses, losses = step_losses(tmp_path), step_losses(two_rank_runs / "dynamic")
    assert sorted(losses) == sorted(ref_losses) == list(range(1, 9))
    for step, value in ref_losses.items():
        assert losses[step] == pytest.approx(value, abs=1e-5), step
    results = json.loads((two_rank_runs / "dynamic" / "results.json").read_text())
    assert results["test"] == pytest.approx(reference["test"], abs=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_nccl_sharded_table_steps_once_per_step_and_the_pipeline_equals_the_plain_loop(tmp_path: Path) -> None:
    from tests.examples.test_torchrun import torchrun

    torchrun(__file__, 2, [], str(tmp_path), "gpu")
    _check_calls(tmp_path, RUNS["gpu"])
    plain, piped = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("plain", "piped"))
    assert plain["device"].startswith("cuda")
    # Same kernels on the same shapes, only where the copies and all-to-alls run moved; GPU kernels may still sum in
    # another order (other negatives would move the losses by far more).
    assert piped["train_loss_history"] == pytest.approx(plain["train_loss_history"], abs=1e-4)
    assert piped["test"] == pytest.approx(plain["test"], abs=0.02)


if __name__ == "__main__":  # a rank of a two-rank launch: output folder, RUNS key
    _rank_worker(Path(sys.argv[1]), sys.argv[2])
