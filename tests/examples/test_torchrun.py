"""The example trainers under torchrun (CPU, gloo, 2 processes): DP=2 and TP=2 runs train the single-process
run's global batches to the same losses and metrics, write their outputs from rank 0 only, and resume exactly from
distributed checkpoints; the ranking trainer trains data parallel; a config that cannot be laid out fails clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from examples.common.config import load_config
from examples.common.distributed import DataParallelBatchSampler, ParallelLayoutError, check_layout
from examples.common.sections import ParallelConfig
from examples.ranking.config import RankingExperimentConfig
from examples.ranking.trainer import RankingTrainer
from examples.retrieval.config import RetrievalExperimentConfig
from examples.retrieval.trainer import RetrievalTrainer, train_lengths
from gr_models.data.batching import EpochBatchSampler, make_dataloader

REPO = Path(__file__).resolve().parents[2]
# conftest's tiny retrieval run (120 users -> 4 global batches of 32 per epoch) with dropout 0 and two heads (so TP=2
# splits them): runs of any layout then train the very same math.
TINY = [
    "data.synthetic.num_users=120",
    "data.synthetic.num_items=80",
    "data.synthetic.num_topics=4",
    "data.synthetic.max_seq_len=30",
    "model.embedding_dim=16",
    "model.max_seq_len=20",
    "model.dropout=0.0",
    "model.hstu.num_heads=2",
    "train.batch_size=32",
    "train.num_negatives=16",
    "train.eval_every=1",
    "train.epochs=2",
    "output.progress=false",
    "output.tensorboard=true",
]
RANKING_TINY = [
    "data.synthetic.num_users=60",
    "data.synthetic.num_items=50",
    "data.synthetic.num_topics=4",
    "data.synthetic.min_seq_len=20",
    "data.synthetic.max_seq_len=30",
    "data.num_candidates=5",
    "data.max_history=10",
    "model.embedding_dim=8",
    "model.head_hidden=16",
    "model.dropout=0.0",
    "train.batch_size=16",
    "train.epochs=1",
    "output.progress=false",
    "output.tensorboard=false",
]


def cli_args(overrides: list[str], *flags: str) -> list[str]:
    return [*flags, "--quiet", *[a for s in overrides for a in ("--set", s)]]


def torchrun(module: str, nproc: int, overrides: list[str], *flags: str) -> subprocess.CompletedProcess[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node nproc -m module`` with ``--set`` overrides
    (``module`` ending in ``.py``: that script, with ``flags`` as its arguments)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    if module.endswith(".py"):
        cmd += [module, *flags]
    else:
        cmd += ["-m", module, *cli_args(overrides, *flags)]
    path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def step_losses(out: Path) -> dict[int, float]:
    """``train/loss`` by global step from every TensorBoard event file under ``out``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses: dict[int, float] = {}
    for f in sorted((out / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f))
        acc.Reload()
        losses.update({e.step: e.value for e in acc.Scalars("train/loss")})
    return losses


def printed_results(stdout: str) -> list[dict]:
    """The results JSON blocks the CLI printed (one per printing rank)."""
    blocks, depth, start = [], 0, 0
    for i, ch in enumerate(stdout):
        if ch == "{":
            depth, start = depth + 1, (i if depth == 0 else start)
        elif ch == "}":
            depth -= 1
            if depth == 0:
                blocks.append(json.loads(stdout[start : i + 1]))
    return blocks


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[int, float]]:
    """The single-process reference run: its results and per-step losses."""
    out = tmp_path_factory.mktemp("single")
    cfg = load_config(RetrievalExperimentConfig, None, [*TINY, f'output.dir="{out}"'])
    results = RetrievalTrainer(cfg).fit()
    return results, step_losses(out)


def check_against_single(out: Path, single: tuple[dict, dict[int, float]]) -> dict:
    reference, ref_losses = single
    results = json.loads((out / "results.json").read_text())
    losses = step_losses(out)
    assert sorted(losses) == sorted(ref_losses)  # every step logged once: rank 0 alone writes TensorBoard
    for step, value in ref_losses.items():
        assert losses[step] == pytest.approx(value, abs=1e-5), f"step {step}: {losses[step]} vs {value}"
    assert results["train_loss_history"] == pytest.approx(reference["train_loss_history"], abs=1e-5)
    assert results["test"] == pytest.approx(reference["test"], abs=1e-6)
    assert results["val_history"] == [pytest.approx(v, abs=1e-6) for v in reference["val_history"]]
    assert results["epochs"] == reference["epochs"] and results["global_steps"] == reference["global_steps"]
    return results


# Three DP=2 runs of the retrieval CLI in one launch (a launch costs ~30 s of imports on 2 cores; gr_parallel keeps its
# context across trainers of the same layout): replicated tables (the CPU default), then tables sharded over the ranks
# (fused Adagrad inside backward: FBGEMM's CPU kernel has no Adam) with the plain loop and with the train pipeline.
SHARDED = ["parallel.table_sharding=model_parallel", "parallel.table_optimizer=adagrad"]
# Clipping by the global norm (across DP after the sync) with contiguous DP slices instead of balanced ones.
CLIPPED = ["parallel.grad_clip=0.5", "parallel.load_balance=false", "train.epochs=1"]
# A gr-dynemb item table (always sharded, its own fused Adam, one step per lookup as in one process).
DYNAMIC = ["model.item_table=dynamic", "train.epochs=1"]
WORKER_RUNS = {
    "dp2": [],
    "plain": [*SHARDED, "parallel.pipeline=false"],
    "piped": [*SHARDED, "parallel.pipeline=true"],
    "clipped": CLIPPED,
    "dynamic": DYNAMIC,
}


def _worker(out: Path) -> None:
    """What each rank of the launch below runs."""
    from examples.retrieval.__main__ import main

    for name, extra in WORKER_RUNS.items():
        assert main(cli_args([*TINY, *extra], "--output-dir", str(out / name))) == 0


@pytest.fixture(scope="module")
def dp2_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("dp2")
    done = torchrun(__file__, 2, [], str(out))
    return out, done.stdout


def test_dp2_equals_single_process(dp2_runs: tuple[Path, str], single: tuple[dict, dict[int, float]]) -> None:
    out, stdout = dp2_runs
    assert len(printed_results(stdout)) == len(WORKER_RUNS)  # rank 0 alone prints, once per run
    run = out / "dp2"
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1  # and writes TensorBoard
    assert (run / "best" / "meta.json").is_file() and (run / "last" / "meta.json").is_file()
    results = check_against_single(run, single)
    assert results["config"]["parallel"]["tp"] == 1 and results["device"] == "cpu"
    alone = load_config(RetrievalExperimentConfig, None, [*TINY, f'output.dir="{run}"'])
    with pytest.raises(FileNotFoundError, match=r"holds a distributed checkpoint .* resume it under torchrun"):
        RetrievalTrainer(alone, resume=True)


@pytest.mark.parametrize(("name", "overrides"), [("clipped", CLIPPED), ("dynamic", DYNAMIC)])
def test_dp2_clipping_and_dynamic_tables_train_like_one_process(
    name: str, overrides: list[str], dp2_runs: tuple[Path, str], tmp_path: Path
) -> None:
    out, _ = dp2_runs
    alone = load_config(RetrievalExperimentConfig, None, [*TINY, *overrides, f'output.dir="{tmp_path}"'])
    reference = RetrievalTrainer(alone).fit()
    check_against_single(out / name, (reference, step_losses(tmp_path)))


def test_sharded_tables_train_pipelined_like_the_plain_loop(dp2_runs: tuple[Path, str]) -> None:
    """The train pipeline (the next batch's input all-to-all during this step) gives the plain loop's results."""
    out, _ = dp2_runs
    plain, piped = (json.loads((out / name / "results.json").read_text()) for name in ("plain", "piped"))
    assert step_losses(out / "piped") == step_losses(out / "plain")
    assert piped["test"] == plain["test"] and piped["val_history"] == plain["val_history"]
    assert plain["train_loss_history"][-1] < plain["train_loss_history"][0]


def test_tp2_equals_single_process_and_resumes_exactly(tmp_path: Path, single: tuple[dict, dict[int, float]]) -> None:
    out = tmp_path / "tp2"
    base = [*TINY, f'output.dir="{out}"']
    # 4 steps per epoch: stop inside epoch 2, then resume to the end from the distributed checkpoint.
    stopped = torchrun("examples.retrieval", 2, [*base, "train.max_steps=6"], "--tp", "2")
    assert printed_results(stopped.stdout) == [{}]  # a stopped run has no test results to print
    assert (out / "last" / "meta.json").is_file() and not (out / "results.json").exists()
    torchrun("examples.retrieval", 2, base, "--tp", "2", "--resume")
    results = check_against_single(out, single)
    assert results["config"]["parallel"]["tp"] == 2


def test_ranking_dp2_trains_like_one_process(tmp_path: Path) -> None:
    reference = RankingTrainer(
        load_config(RankingExperimentConfig, None, [*RANKING_TINY, f'output.dir="{tmp_path / "single"}"'])
    ).fit()
    out = tmp_path / "dp2"
    torchrun("examples.ranking", 2, [*RANKING_TINY, f'output.dir="{out}"'])
    results = json.loads((out / "results.json").read_text())
    assert results["train_loss_history"] == pytest.approx(reference["train_loss_history"], abs=1e-5)
    assert results["test"] == pytest.approx(reference["test"], abs=1e-5)
    assert not (out / "model_bundle.pt").exists()  # the serving bundle comes from single-process runs


# ------------------------------------------------------------------------------------------ no processes needed
def test_data_parallel_batches_partition_the_single_process_batches(
    retrieval_config: Callable[..., RetrievalExperimentConfig], tmp_path: Path
) -> None:
    trainer = RetrievalTrainer(retrieval_config(tmp_path, "train.epochs=1"))
    ds = trainer.train_set
    lengths = train_lengths(ds)[:119]  # 119 = 3 * 32 + 23: a last global batch that splits unevenly over 2 ranks
    single = EpochBatchSampler(len(lengths), 32, shuffle=True, seed=7)
    ranks = [
        DataParallelBatchSampler(lengths, 32, dp_size=2, dp_rank=r, seed=7, load_balance=lb)
        for r in range(2)
        for lb in (True, False)
    ]
    for epoch in (0, 3):
        single.set_epoch(epoch)
        for s in ranks:
            s.set_epoch(epoch)
        expected = list(single)
        for lb in (0, 1):
            pair = (ranks[lb], ranks[2 + lb])
            loaders = [make_dataloader(ds, s) for s in pair]
            for step, (whole, *parts) in enumerate(zip(expected, *loaders, strict=True)):
                plans = [s.plan for s in pair]
                got = sorted(i for p in plans for i in p.global_indices[p.local_positions].tolist())
                assert got == sorted(whole), f"epoch {epoch} step {step}: ranks do not cover the global batch"
                assert sorted(len(p) for p in parts) == [len(whole) // 2, -(-len(whole) // 2)]
                assert plans[0].global_tokens == int(lengths[whole].sum())
                # Each rank's targets sit at its token rows of the global batch's single-process layout.
                full = make_dataloader(ds, _Fixed([whole])).__iter__().__next__().target_items
                for plan, batch in zip(plans, parts, strict=True):
                    rows = torch.from_numpy(plan.token_rows())
                    torch.testing.assert_close(full[rows], batch.target_items, rtol=0, atol=0)


class _Fixed:
    """A batch sampler over given batches (with the ``seed`` make_dataloader reads)."""

    seed = 0

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@pytest.mark.parametrize(
    ("world", "tp", "batch", "heads", "encoder", "match"),
    [
        (3, 2, 32, 2, "hstu", "does not divide the world size 3"),
        (2, 2, 32, 3, "hstu", "must divide model.hstu.num_heads=3"),
        (2, 2, 32, 2, "sasrec", "this model has none"),
        (4, 1, 30, 2, "hstu", "train.batch_size=30 is the global batch and must be divisible"),
    ],
)
def test_layout_errors_name_the_key(world: int, tp: int, batch: int, heads: int, encoder: str, match: str) -> None:
    with pytest.raises(ParallelLayoutError, match=match):
        check_layout(ParallelConfig(tp=tp), world, batch_size=batch, eval_batch_size=256, num_heads=heads,
                     encoder=encoder)  # fmt: skip
    assert check_layout(ParallelConfig(tp=2), 4, batch_size=32, eval_batch_size=256, num_heads=2) == 2


def test_tp_without_launcher_says_how_to_launch(retrieval_config: Callable[..., RetrievalExperimentConfig],
                                               tmp_path: Path) -> None:  # fmt: skip
    with pytest.raises(ParallelLayoutError, match="needs 2 processes: launch with `torchrun --nproc-per-node 2"):
        RetrievalTrainer(retrieval_config(tmp_path, "parallel.tp=2", "model.hstu.num_heads=2"))


def test_cli_reports_layout_errors_as_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from examples.retrieval.__main__ import main

    assert main(["--tp", "2", "--output-dir", str(tmp_path), "--set", "model.hstu.num_heads=2"]) == 2
    assert "error: parallel.tp=2 needs 2 processes" in capsys.readouterr().err


def test_parallel_section_is_validated() -> None:
    for bad, match in [("tp=0", "parallel.tp"), ('backend="mpi"', "parallel.backend"), ("grad_clip=-1", "grad_clip")]:
        with pytest.raises(ValueError, match=match):
            load_config(RetrievalExperimentConfig, None, [f"parallel.{bad}"])


# ------------------------------------------------------------------------------------------ GPUs (NCCL)
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_nccl_dp2_and_tp2_equal_one_gpu_and_sharded_tables_train(tmp_path: Path) -> None:
    """Same code path on GPUs: with replicated tables (the dense AdamW, like one process) DP=2 and TP=2 over NCCL
    train the one-GPU run's losses; with the CUDA default (tables sharded over the GPUs, fused Adam) it trains."""
    import importlib.util

    # Per-step losses come from TensorBoard where it is installed (GPU stacks may lack it): else epoch means.
    board = importlib.util.find_spec("tensorboard") is not None
    gpu = [*TINY, "parallel.backend=nccl", f"output.tensorboard={str(board).lower()}"]  # one process ignores backend
    replicated = [*gpu, "parallel.table_sharding=data_parallel"]
    out = tmp_path / "one"
    reference = RetrievalTrainer(
        load_config(RetrievalExperimentConfig, None, [*replicated, f'output.dir="{out}"'])
    ).fit()
    ref_losses = step_losses(out) if board else {}
    for name, flags in (("dp2", ()), ("tp2", ("--tp", "2"))):
        run = tmp_path / name
        torchrun("examples.retrieval", 2, [*replicated, f'output.dir="{run}"'], *flags)
        results = json.loads((run / "results.json").read_text())
        losses = step_losses(run) if board else {}
        assert results["device"].startswith("cuda") and sorted(losses) == sorted(ref_losses)
        for step, value in ref_losses.items():  # fp32 on GPUs: other kernels per batch shape, so not bit-exact
            assert losses[step] == pytest.approx(value, abs=1e-4), f"{name} step {step}: {losses[step]} vs {value}"
        assert results["train_loss_history"] == pytest.approx(reference["train_loss_history"], abs=1e-4)
        assert results["test"]["hr@200"] == pytest.approx(reference["test"]["hr@200"], abs=0.02)
    sharded = tmp_path / "sharded"
    torchrun("examples.retrieval", 2, [*gpu, f'output.dir="{sharded}"', "train.max_steps=5"])
    torchrun("examples.retrieval", 2, [*gpu, f'output.dir="{sharded}"'], "--resume")
    results = json.loads((sharded / "results.json").read_text())
    assert results["global_steps"] == reference["global_steps"] and 0 <= results["test"]["hr@10"] <= 1
    assert results["train_loss_history"][-1] < results["train_loss_history"][0]


if __name__ == "__main__":  # a rank of the dp2_runs launch
    _worker(Path(sys.argv[1]))
