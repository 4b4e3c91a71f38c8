"""Hybrid-parallel training throughput: HSTU retrieval training at 1, 2 (and 4) GPUs, DP against TP.

Each configuration ``(gpus, tp)`` (``dp = gpus / tp``) is one ``torchrun`` job of this script in ``--worker`` mode:
a ``gr_models`` ``RetrievalModel`` (HSTU encoder, static item table) goes through ``gr_parallel.parallelize`` (item
table sharded by TorchRec over every rank, HSTU blocks tensor-parallel over ``tp``, dense gradients all-reduced over
``dp``), then trains on synthetic jagged batches with the sampled softmax loss, bf16 autocast, fused row-wise Adagrad
tables and fused AdamW dense parameters. After ``--warmup`` steps, ``--steps`` steps are timed.

Data: each step is one global batch of ``--seqs-per-rank`` x ``dp`` sequences (lengths uniform in [1,
``--max-len``], uniform item ids; a pure function of the batch's index, so every rank draws the same), split over the
DP ranks with equal sequence counts (DP grows the global batch, TP does not; the TP ranks of a DP group train the same
share; 1 GPU trains ``--seqs-per-rank`` sequences, the same work per GPU). With jagged sequences a rank's step time
follows its sum of L^2 (attention) plus its tokens (projections), and the slowest DP rank sets every step's pace, so
``--balance flops`` (default) splits with ``gr_parallel.load_balance.balanced_partition`` on each sequence's HSTU
training FLOPs (``l2``: on L^2 alone; ``none``: contiguous chunks, the length-blind split of the same batches); the
record's ``dp_cost_imbalance`` is the timed steps' mean of max / mean per-DP-rank FLOPs. The host's work on the data
(drawing ~65k item ids per rank, building the KJTs, uniform negatives, pinning on CUDA) is done before timing: a
pool of ``--pool`` distinct global batches is built up front and the warm-up and timed steps cycle through it, as a
data loader's workers would prepare batches off the training loop.

The step is the production one: ``RetrievalModel.training_forward`` looks the inputs and the targets up in ONE table
call (one input/output all-to-all when sharded, one fused table-optimizer step), ``--negatives in_batch`` (default)
gathers the negatives from the targets' rows (``uniform``: ``[tokens, K]`` catalogue ids drawn with the batch and
looked up in the same call), the looked-up rows and their gradients cross the sharding all-to-alls in bf16 on CUDA
(``--qcomms``, TorchRec's quantized comms; the table stays fp32), and the loop is a plain one by default;
``--pipeline`` runs it through ``gr_parallel.TrainPipeline`` (the next batch's host-to-device copy and sparse input
all-to-all overlap this step).
``--seqs-per-rank`` defaults to 32 (~65k tokens per rank at lengths U[1, 4096]) so that the HSTU blocks dominate the
step rather than per-step host and lookup overheads; on one H200 that is the 10M x 512 fp32 table (20 GB, plus 40 MB
of row-wise Adagrad state) and roughly 20-30 GB of activations, well inside 141 GB (``peak_memory_gb`` in the record).

Reported per configuration: tokens/s (all ranks), model TFLOP/s per GPU, MFU against 989 dense bf16 TFLOP/s (H100/H200
SXM), and scaling efficiency = tokens/s / (gpus x the 1-GPU tokens/s). Model FLOPs count the HSTU blocks only, as
NVIDIA's recsys-examples do: per token and block 2 * D * (2 * H * (Dqk + Dv)) for the U/V/Q/K projection and
2 * H * Dv * D for the output projection; per sequence and block 2 * H * Dqk * L^2 for causal attention (the
forward convention of tools/bench_hstu_attention.py); backward = 2x the projections and 2.5x the attention.

    python tools/bench_parallel.py --configs 1x1 2x1 2x2           # GPU machine: 1 GPU, 2 GPUs DP=2, 2 GPUs TP=2
    python tools/bench_parallel.py --device cpu --tiny --configs 1x1 2x1 2x2   # gloo smoke run of the same path
    python tools/bench_parallel.py --replot

Writes ``docs/benchmarks/parallel.{json,md,png}`` (``--out``); records
``{"gpus", "tp", "dp", "tokens_per_s", "tflops_per_gpu", "mfu", "scaling_efficiency", ...}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
PEAK_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16


def hstu_flop_coefs(blocks: int, dim: int, heads: int, dqk: int, dv: int) -> tuple[float, float]:
    """Training FLOPs (forward + backward) of the HSTU blocks as ``(per token, per L^2 of a sequence)``."""
    proj_fwd = 2 * dim * 2 * heads * (dqk + dv) + 2 * heads * dv * dim
    attn_fwd = 2 * heads * dqk
    return blocks * 3 * proj_fwd, blocks * 3.5 * attn_fwd


def hstu_flops(lengths: list[int], blocks: int, dim: int, heads: int, dqk: int, dv: int) -> float:
    """Training FLOPs (forward + backward) of the HSTU blocks for sequences of ``lengths``."""
    per_token, per_square = hstu_flop_coefs(blocks, dim, heads, dqk, dv)
    return per_token * sum(lengths) + per_square * sum(n * n for n in lengths)


# ---------------------------------------------------------------------------------------------------- batches
BALANCE_MODES = ("flops", "l2", "none")
PROFILE_LEAD_IN = 2  # unprofiled steps between the timed loop's final sync and the profiled ones


@dataclasses.dataclass
class GlobalBatch:
    """One step's sequences over all DP ranks: lengths and, concatenated in sequence order, items and targets."""

    lengths: torch.Tensor
    items: torch.Tensor
    targets: torch.Tensor


def draw_global_batch(index: int, num_seqs: int, max_len: int, num_items: int) -> GlobalBatch:
    """Global batch ``index`` of the synthetic data: ``num_seqs`` lengths U[1, ``max_len``], uniform item ids; a pure
    function of its arguments, so every rank draws the same one."""
    g = torch.Generator().manual_seed(1_000_003 * index)
    lengths = torch.randint(1, max_len + 1, (num_seqs,), generator=g)
    total = int(lengths.sum())
    items = torch.randint(0, num_items, (total,), generator=g)
    targets = torch.randint(0, num_items, (total,), generator=g)
    return GlobalBatch(lengths, items, targets)


def dp_partition(lengths: list[int], dp: int, balance: str, linear_coef: float) -> list[list[int]]:
    """Each DP rank's positions into the global batch, ``len(lengths) // dp`` each (``lengths`` a multiple of
    ``dp``). ``flops``: gr_parallel's balancer on the cost ``L^2 + linear_coef * L`` (``linear_coef`` from
    :func:`hstu_flop_coefs`: the cost is the sequence's HSTU training FLOPs up to a constant); ``l2``: on ``L^2``
    (attention only); ``none``: contiguous chunks, the length-blind split."""
    from gr_parallel.load_balance import balanced_partition, contiguous_partition

    if balance not in BALANCE_MODES:
        raise ValueError(f"balance must be one of {BALANCE_MODES}, got {balance!r}")
    if balance == "none":
        return contiguous_partition(len(lengths), dp)
    return balanced_partition(lengths, dp, linear_coef=linear_coef if balance == "flops" else 0.0)


def rank_batch(gb: GlobalBatch, positions: list[int]):
    """The ``SequenceBatch`` of the global batch's sequences at ``positions`` (in that order)."""
    from torchrec import KeyedJaggedTensor

    from gr_models.data.batching import ITEM_FEATURE, SequenceBatch

    if not positions:
        raise ValueError("a DP rank got no sequence: the global batch needs at least one per rank")
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), gb.lengths.cumsum(0)])
    tokens = torch.cat([torch.arange(int(starts[i]), int(starts[i + 1])) for i in positions])
    lengths = gb.lengths[positions]
    total = int(lengths.sum())
    items, targets = gb.items[tokens], gb.targets[tokens]
    ts = torch.arange(total, dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    features = KeyedJaggedTensor(
        keys=[ITEM_FEATURE], values=items, lengths=lengths, length_per_key=[total], offset_per_key=[0, total]
    )
    return SequenceBatch(
        user_ids=torch.arange(len(lengths)),
        features=features,
        timestamps=ts,
        seq_offsets=offsets,
        max_seq_len=int(lengths.max()),
        target_items=targets,
        target_timestamps=ts + 1,
        offsets_checked=True,  # cumulative sums on the host, as collate_sequences builds them: no per-step sync
    )


def item_table_on_meta(model, num_items: int, weights: str = "fp32"):
    """``model`` (built with a 1-row item table) with a ``num_items``-row table on the meta device: TorchRec's
    sharded modules then initialise their shards on their own devices, so no rank builds the full table on the host
    (10M x 512 fp32 rows are 20 GB). ``weights``: the table's storage precision (TorchRec ``data_type``)."""
    from torchrec import DataType, EmbeddingCollection, EmbeddingConfig

    emb = model.input_embedding
    (table,) = emb.item_embeddings.embedding_configs()
    meta = EmbeddingConfig(
        name=table.name,
        embedding_dim=table.embedding_dim,
        num_embeddings=num_items,
        feature_names=table.feature_names,
        init_fn=table.init_fn,
        data_type={"fp32": DataType.FP32, "fp16": DataType.FP16}[weights],
    )
    emb.item_embeddings = EmbeddingCollection(tables=[meta], device=torch.device("meta"))
    emb.num_items = model.config.num_items = num_items
    return model


@dataclasses.dataclass
class BenchBatch:
    """One step's batch with the one KJT its training forward looks up (inputs, then targets), moved as one: the
    train pipeline prefetches the table's input dist of ``features`` and the forward passes that very object on."""

    batch: Any
    features: Any
    negatives: torch.Tensor | None  # uniform negatives' ids, drawn with the batch (their rows are in features)
    step: int

    def to(self, device: torch.device, non_blocking: bool = False) -> BenchBatch:
        negatives = None if self.negatives is None else self.negatives.to(device, non_blocking=non_blocking)
        return BenchBatch(
            self.batch.to(device, non_blocking=non_blocking),
            self.features.to(device, non_blocking=non_blocking),
            negatives,
            self.step,
        )

    def pin_memory(self) -> BenchBatch:
        """In page-locked host memory (what a DataLoader with ``pin_memory=True`` hands over): the copy to the GPU
        then runs asynchronously."""
        negatives = None if self.negatives is None else self.negatives.pin_memory()
        return BenchBatch(self.batch.pin_memory(), self.features.pin_memory(), negatives, self.step)


@dataclasses.dataclass
class PoolEntry:
    """A pre-built step: this rank's batch, and what the step computes over all DP ranks."""

    batch: BenchBatch
    flops: float  # HSTU training FLOPs of the global batch
    tokens: int  # of the global batch
    imbalance: float  # max / mean over the DP ranks of their HSTU training FLOPs


class _GcPauses:
    """Python's garbage-collector pauses per generation (count, total ms) while installed: a full collection walks
    every live object, and a process holding TorchRec, Megatron and compiled graphs has millions of them."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses[info["generation"]].append(time.perf_counter() - self._start)

    def stop(self) -> dict[str, str]:
        gc.callbacks.remove(self._callback)
        return {f"gen{g}": f"{len(p)}x, {sum(p) * 1e3:.1f} ms" for g, p in self.pauses.items()}


def profiled_kernel_time(table, pool: list, args: argparse.Namespace, gpus: int) -> dict[str, float]:
    """From the profiler's ``key_averages()`` of the --profile-steps profiled steps: their device time a step (every
    kernel, copy and memset, summed over streams) and the model TFLOP/s per GPU of those steps' batches at that time.
    The profiled steps run the batches after the timed ones and PROFILE_LEAD_IN more (the pool cycles)."""
    from torch.autograd import DeviceType

    # As the profiler table's "Self CUDA time total": device-side events only (CPU ops report their kernels' time as
    # well), user annotations' GPU ranges left out.
    device_us = sum(
        e.self_device_time_total
        for e in table
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
    )
    first = args.warmup + args.steps + PROFILE_LEAD_IN
    flops = sum(pool[s % len(pool)].flops for s in range(first, first + args.profile_steps))
    return {
        "profiled_kernel_ms": round(device_us / 1e3 / args.profile_steps, 2),
        "profiled_kernel_tflops_per_gpu": round(flops / (device_us / 1e6) / gpus / 1e12, 2) if device_us else None,
    }


def build_pool(args: argparse.Namespace, ctx, net, loss_fn, hstu, size: int) -> list[PoolEntry]:
    """``size`` distinct global batches of ``seqs_per_rank * dp`` sequences, each split over the DP ranks by
    ``args.balance``; this rank's share as a ready step (KJTs built, uniform negatives drawn, pinned on CUDA). Built
    before the loop: the host draw is a data loader's work (its workers'), not the step's."""
    dims = (args.blocks, args.dim, args.heads, hstu.qk_dim, hstu.v_dim)
    per_token, per_square = hstu_flop_coefs(*dims)
    pool = []
    for index in range(size):
        gb = draw_global_batch(index, args.seqs_per_rank * ctx.dp_size, args.max_len, args.num_items)
        lengths = gb.lengths.tolist()
        parts = dp_partition(lengths, ctx.dp_size, args.balance, per_token / per_square)
        rank_flops = [hstu_flops([lengths[i] for i in part], *dims) for part in parts]
        batch = rank_batch(gb, parts[ctx.dp_rank])  # TP ranks of a DP group: the same part
        negatives = loss_fn.sample_negatives(batch.target_items) if args.negatives == "uniform" else None
        bb = BenchBatch(batch, net.training_features(batch, negatives), negatives, index)
        if ctx.device.type == "cuda" and args.pin_memory:
            bb = bb.pin_memory()
        mean = sum(rank_flops) / len(rank_flops)
        pool.append(PoolEntry(bb, sum(rank_flops), sum(lengths), max(rank_flops) / mean))
    return pool


def worker(args: argparse.Namespace) -> None:
    import gr_parallel

    if args.compile:  # why a compiled region recompiles or breaks, in the worker's log
        torch._logging.set_logs(recompiles=True, graph_breaks=True)
    from gr_models.modules.hstu import HSTUConfig
    from gr_models.retrieval import RetrievalModelConfig, SampledSoftmaxLoss
    from gr_models.retrieval.model import RetrievalModel
    from gr_parallel.parallelize import EmbeddingOptimizerConfig, ParallelizeConfig

    ctx = gr_parallel.initialize(gr_parallel.ParallelConfig(tp=args.tp))
    torch.manual_seed(0)
    hstu = HSTUConfig(
        embedding_dim=args.dim,
        num_blocks=args.blocks,
        num_heads=args.heads,
        use_rab=False,
        attention_backend="auto",
        fused_norms=args.fused_norms,
        fused_projection=args.fused_projection,
        fused_residual=args.fused_residual,
        cuda_graphs=args.cuda_graphs,
    )
    cfg = RetrievalModelConfig(
        num_items=args.num_items, embedding_dim=args.dim, max_seq_len=args.max_len, dropout=0.0, hstu=hstu
    )
    model = item_table_on_meta(
        RetrievalModel(dataclasses.replace(cfg, num_items=1)), args.num_items, args.table_weights
    )
    pm = gr_parallel.parallelize(
        model,
        ctx,
        ParallelizeConfig(
            embedding_optimizer=EmbeddingOptimizerConfig(kind="rowwise_adagrad", lr=0.01),
            bf16=ctx.device.type == "cuda",
            grad_clip=1.0,
            qcomms=None if args.qcomms == "none" else args.qcomms,
            compile_dense=args.compile,
        ),
    )
    loss_fn = SampledSoftmaxLoss(args.num_items, args.num_negatives, 0.05, args.negatives)
    net = pm.module
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
    total_steps = args.warmup + args.steps + (PROFILE_LEAD_IN + args.profile_steps if args.profile else 0)
    pool = build_pool(args, ctx, net, loss_fn, hstu, min(args.pool, total_steps))

    def batches(start: int, stop: int):
        for step in range(start, stop):
            yield dataclasses.replace(pool[step % len(pool)].batch, step=step)

    def step_loss(bb: BenchBatch) -> torch.Tensor:
        """One table lookup: inputs, targets (and uniform negatives, drawn with the batch); in-batch negatives are
        gathered from the targets' rows."""
        with pm.autocast():
            emb = net.training_forward(bb.batch, bb.features, bb.negatives)
            # The embeddings as training_forward gives them (bf16 under autocast): the loss's gather and matmuls
            # read that dtype, so casting them here would add [N, D] copies each way.
            return loss_fn(
                emb.queries,
                bb.batch.target_items,
                target_embeddings=emb.targets,
                negatives=bb.negatives,
                negative_embeddings=emb.negatives,
            )

    def before_step() -> None:
        pm.sync_grads()
        pm.clip_grad_norm_()

    if not args.pipeline:

        def one_step(it) -> torch.Tensor:
            bb = next(it).to(ctx.device, non_blocking=True)
            loss = step_loss(bb)
            loss.backward()
            pm.step()
            return loss.detach()

    else:
        pipeline = gr_parallel.TrainPipeline(
            pm.dmp,
            pm.optimizer,
            ctx.device,
            forward=step_loss,
            sparse_features=lambda bb: {"item_embeddings": bb.features},
            before_step=before_step,
            zero_grad=pm.zero_grad,
        )

        def one_step(it) -> torch.Tensor:
            return pipeline.progress(it).detach()

    # One stream of batches: in the pipeline each step prefetches the next (the first timed step's input was
    # prefetched during the last warm-up step, as in a long run).
    from torch._dynamo.utils import counters

    def compiled_frames() -> int:
        return counters["frames"]["total"]

    it = batches(0, total_steps)
    for _ in range(args.warmup):
        one_step(it)
    sync()
    frames_warmup = compiled_frames()
    gc_pauses = _GcPauses()
    # Per timed step: when the host finished issuing it, and (CUDA) an event after its work, so a slow step (e.g. a
    # recompile) shows without adding a sync.
    cuda = ctx.device.type == "cuda"
    events = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)] if cuda else []
    if cuda:
        events[0].record()
    t0 = time.perf_counter()
    losses, host_marks = [], [t0]
    for i in range(args.steps):
        losses.append(one_step(it))
        host_marks.append(time.perf_counter())
        if cuda:
            events[i + 1].record()
    sync()
    wall = time.perf_counter() - t0
    host_ms = [round((b - a) * 1e3, 1) for a, b in itertools.pairwise(host_marks)]
    gpu_ms = [round(a.elapsed_time(b), 1) for a, b in itertools.pairwise(events)]
    frames_timed = compiled_frames() - frames_warmup
    gc_ms = gc_pauses.stop()
    if ctx.rank == 0:
        print(f"per timed step: host ms {host_ms}; device ms (event to event) {gpu_ms or '-'}", flush=True)
        print(f"python gc during the timed steps: {gc_ms}", flush=True)
        print(
            f"torch.compile: {frames_warmup} frames compiled in the warm-up, {frames_timed} during the timed steps; "
            f"graph breaks {dict(counters['graph_break']) or 0}",
            flush=True,
        )
    profiled: dict[str, float] | None = None
    if args.profile:
        # Two unprofiled steps first (the queue refills after the sync above, as in the timed loop), then
        # --profile-steps profiled steps on every rank (the collectives need them all); rank r > 0 writes its trace
        # next to rank 0's (``.rank{r}`` before the suffix).
        from torch.profiler import ProfilerActivity, profile

        for _ in range(PROFILE_LEAD_IN):
            one_step(it)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(args.profile_steps):
                one_step(it)
            sync()
        if ctx.rank == 0:
            table = prof.key_averages()
            if ctx.device.type == "cuda":
                print(table.table(sort_by="self_cuda_time_total", row_limit=30), flush=True)
                profiled = profiled_kernel_time(table, pool, args, ctx.world_size)
                print(
                    f"profiled steps: {profiled['profiled_kernel_ms']} ms of device time a step, "
                    f"{profiled['profiled_kernel_tflops_per_gpu']} TFLOP/s per GPU if the GPU set the pace",
                    flush=True,
                )
            print(table.table(sort_by="self_cpu_time_total", row_limit=25), flush=True)  # the host's share
        if args.trace:
            path = Path(args.trace)
            prof.export_chrome_trace(str(path if ctx.rank == 0 else path.with_suffix(f".rank{ctx.rank}{path.suffix}")))
    if args.pipeline:
        pipeline.reset()
    # Global work of the timed steps: every rank knows the global batches.
    timed = [pool[s % len(pool)] for s in range(args.warmup, args.warmup + args.steps)]
    flops, tokens = sum(e.flops for e in timed), sum(e.tokens for e in timed)
    imbalance = sum(e.imbalance for e in timed) / len(timed)
    times = torch.tensor([wall], dtype=torch.float64, device=ctx.device)
    torch.distributed.all_reduce(times, op=torch.distributed.ReduceOp.MAX)  # the slowest rank sets the pace
    wall = float(times[0])
    if ctx.rank == 0:
        gpus = ctx.world_size
        tflops_per_gpu = flops / wall / gpus / 1e12
        record = {
            "device": torch.cuda.get_device_name(0) if ctx.device.type == "cuda" else "cpu",
            "gpus": gpus,
            "tp": ctx.tp_size,
            "dp": ctx.dp_size,
            "tokens_per_s": round(tokens / wall, 1),
            "tflops_per_gpu": round(tflops_per_gpu, 2),
            "mfu": round(tflops_per_gpu / PEAK_BF16_TFLOPS, 4),
            "step_ms": round(wall / args.steps * 1e3, 2),
            "loss_first": round(float(losses[0]), 4),
            "loss_last": round(float(losses[-1]), 4),
            "blocks": args.blocks,
            "dim": args.dim,
            "heads": args.heads,
            "max_len": args.max_len,
            "seqs_per_rank": args.seqs_per_rank,
            "balance": args.balance,  # how the global batch is split over the DP ranks
            "dp_cost_imbalance": round(imbalance, 4),  # timed steps' mean of max / mean per-DP-rank HSTU FLOPs
            "batch_pool": len(pool),  # distinct pre-built batches the steps cycle through
            "num_items": args.num_items,
            "table_weights": args.table_weights,
            "fused_norms": args.fused_norms and ctx.device.type == "cuda",  # elsewhere the blocks run eager norms
            "fused_projection": args.fused_projection and ctx.device.type == "cuda",  # likewise
            "fused_residual": args.fused_residual and ctx.device.type == "cuda",  # likewise
            "cuda_graphs": args.cuda_graphs and ctx.device.type == "cuda",  # HSTUConfig.cuda_graphs
            "negatives": args.negatives,
            "num_negatives": args.num_negatives,
            "in_batch_logits": in_batch_logits_backend(ctx.device) if args.negatives == "in_batch" else None,
            "pipeline": args.pipeline,
            "qcomms": args.qcomms,
            "compiled": args.compile,
            "compiled_frames_timed": frames_timed,  # torch.compile frames compiled during the timed steps (0 wanted)
            "step_host_ms": host_ms,
            "step_device_ms": gpu_ms or None,
            "table_lookups_per_step": 1,
            "steps": args.steps,
            # --profile on CUDA: device time of the profiled steps (kernels, copies, memsets summed) and the
            # throughput a GPU-paced step would have; wall-clock steps are paced by the host wherever it is slower.
            **(profiled or {"profiled_kernel_ms": None, "profiled_kernel_tflops_per_gpu": None}),
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1)
            if ctx.device.type == "cuda"
            else None,
        }
        Path(args.record).write_text(json.dumps(record) + "\n")
    gr_parallel.destroy()


# ---------------------------------------------------------------------------------------------------- launcher
def run_config(args: argparse.Namespace, gpus: int, tp: int, record: Path) -> dict:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
        str(Path(__file__).resolve()), "--worker", f"--tp={tp}", f"--record={record}",
        f"--blocks={args.blocks}", f"--dim={args.dim}", f"--heads={args.heads}", f"--max-len={args.max_len}",
        f"--seqs-per-rank={args.seqs_per_rank}", f"--num-items={args.num_items}",
        f"--table-weights={args.table_weights}",
        "--fused-norms" if args.fused_norms else "--no-fused-norms",
        "--fused-projection" if args.fused_projection else "--no-fused-projection", f"--negatives={args.negatives}",
        "--fused-residual" if args.fused_residual else "--no-fused-residual",
        "--cuda-graphs" if args.cuda_graphs else "--no-cuda-graphs",
        f"--num-negatives={args.num_negatives}", f"--warmup={args.warmup}", f"--steps={args.steps}",
        f"--qcomms={args.qcomms}", f"--balance={args.balance}", f"--pool={args.pool}",
        "--pin-memory" if args.pin_memory else "--no-pin-memory",
        *(["--profile", f"--profile-steps={args.profile_steps}"] if args.profile else []),
        *([f"--trace={args.trace}"] if args.trace else []),
        *(["--pipeline"] if args.pipeline else []),
        *(["--compile"] if args.compile else []),
    ]  # fmt: skip
    env = dict(os.environ)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    print(f"config {gpus}x{tp}: {time.perf_counter() - t:.0f}s", file=sys.stderr)
    return json.loads(record.read_text())


def add_scaling(records: list[dict]) -> None:
    base = {r["device"]: r["tokens_per_s"] for r in records if r["gpus"] == 1}
    for r in records:
        one = base.get(r["device"])
        r["scaling_efficiency"] = round(r["tokens_per_s"] / (r["gpus"] * one), 4) if one else None


def in_batch_logits_backend(device: torch.device) -> str:
    """What ``gathered_logits`` runs the in-batch negatives' logits on here (bf16 operands, as under autocast)."""
    from gr_models.retrieval.gathered_logits import resolve_backend

    probe = torch.empty(1, 1, dtype=torch.bfloat16, device=device)
    return resolve_backend(None, probe, probe)


def step_kind(r: dict) -> str:
    """How the step ran; records from before these fields existed: uniform negatives, 3 lookups, plain loop, eager
    HSTU blocks; in-batch records without ``in_batch_logits`` ran the chunked torch gather."""
    compiled = ", compiled" if r.get("compiled") else ""
    compiled += ", fp16 table" if r.get("table_weights", "fp32") == "fp16" else ""
    compiled += ", fused norms" if r.get("fused_norms") else ""
    compiled += ", fused projection" if r.get("fused_projection") else ""
    compiled += ", fused residual" if r.get("fused_residual") else ""
    compiled += ", CUDA graphs" if r.get("cuda_graphs") else ""
    if "negatives" not in r:
        return "uniform (3 lookups), plain, fp32" + compiled
    comms = "fp32" if r.get("qcomms", "none") == "none" else r["qcomms"]
    negatives = r["negatives"]
    if negatives == "in_batch":
        negatives += f" ({r.get('in_batch_logits') or 'torch'} gather)"
    return f"{negatives}, {'pipeline' if r.get('pipeline') else 'plain'}, {comms}{compiled}"


def dp_split(balance: str | None) -> str:
    """How a record's DP ranks got their sequences (records from before ``balance`` drew their own per rank)."""
    if balance is None:
        return "own draw per rank"
    return {"flops": "balanced (FLOPs)", "l2": "balanced (L^2)", "none": "contiguous"}[balance]


def markdown(runs: list[dict], records: list[dict]) -> str:
    lines = ["# Hybrid-parallel HSTU training throughput", ""]
    for run in runs:
        lines.append(
            f"- **{run['device']}**: `{run['command']}`; {run['machine']}; torch {run['torch']}; {run['date']}. "
            f"Model: {run['model']}."
        )
    lines += [
        "",
        "Model FLOPs: HSTU blocks only (projections 3x forward, attention 3.5x forward); MFU against "
        f"{PEAK_BF16_TFLOPS:.0f} TFLOP/s. Scaling efficiency: tokens/s over (GPUs x the 1-GPU tokens/s).",
        "",
        "Step: negatives (in-batch: the gathered_logits backend of their logits, torch = chunked gather with "
        "index_add_, triton = gr-models' Triton kernels), loop (pipeline = gr_parallel.TrainPipeline), precision of "
        "the embedding all-to-alls; compiled = HSTU blocks' dense parts under torch.compile "
        "(ParallelizeConfig.compile_dense).",
        "",
        "DP split: each step draws one global batch of seqs/rank x DP sequences (the same on every rank) and splits "
        "it over the DP ranks with equal sequence counts: balanced = gr_parallel.load_balance.balanced_partition on "
        "each sequence's HSTU training FLOPs (or on L^2 alone), contiguous = consecutive chunks, length-blind; the TP"
        " ranks of a DP group train the same share. The batches (a pool of distinct ones, cycled) are drawn and their"
        " KJTs built before the timed loop, as a data loader's workers would, and pinned on CUDA. DP cost max/mean: "
        "mean over the timed steps of the heaviest DP rank's HSTU FLOPs over the ranks' mean (1 = perfectly even; the"
        " slowest rank sets the pace). Records without a DP split drew each rank's sequences independently, on the "
        "main thread inside the timed loop.",
        "",
        "| device | GPUs | TP | DP | step | seqs/rank | DP split | DP cost max/mean | step ms | tokens/s "
        "| TFLOP/s per GPU | MFU | scaling efficiency |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        eff = "-" if r.get("scaling_efficiency") is None else f"{r['scaling_efficiency']:.0%}"
        imbalance = "-" if r.get("dp_cost_imbalance") is None else f"{r['dp_cost_imbalance']:.3f}"
        lines.append(
            f"| {r['device']} | {r['gpus']} | {r['tp']} | {r['dp']} | {step_kind(r)} | {r.get('seqs_per_rank', '-')} | "
            f"{dp_split(r.get('balance'))} | {imbalance} | {r['step_ms']} | {r['tokens_per_s']:.0f} | "
            f"{r['tflops_per_gpu']:.1f} | {r['mfu']:.1%} | {eff} |"
        )
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{r['device'][:12]}\n{r['gpus']} GPU TP{r['tp']} DP{r['dp']}" for r in records]
    axes[0].bar(labels, [r["tokens_per_s"] for r in records], color="tab:blue")
    axes[0].set_ylabel("tokens/s")
    axes[1].bar(labels, [r["tflops_per_gpu"] for r in records], color="tab:orange")
    axes[1].set_ylabel("model TFLOP/s per GPU")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("HSTU hybrid-parallel training (bench_parallel.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--configs", nargs="+", default=["1x1", "2x1", "2x2"], help="GPUSxTP, e.g. 2x2 = 2 GPUs, TP=2")
    ap.add_argument("--tiny", action="store_true", help="a small model and batch (CPU smoke runs)")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--seqs-per-rank", type=int, default=32)
    ap.add_argument("--num-items", type=int, default=10_000_000)
    ap.add_argument(
        "--negatives",
        default="in_batch",
        choices=["in_batch", "uniform"],
        help="in_batch: gathered from the targets' rows; uniform: over the catalogue, looked up with the batch",
    )
    ap.add_argument("--num-negatives", type=int, default=32)
    ap.add_argument(
        "--qcomms",
        choices=["auto", "none", "bf16", "fp16"],
        default="auto",
        help="precision of the looked-up rows and their gradients on the embedding all-to-alls (auto: bf16 on "
        "CUDA, none on CPU)",
    )
    ap.add_argument(
        "--fused-norms",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="HSTUConfig.fused_norms (the default): the blocks' LayerNorms as Triton ops (gr_models.modules.norm_mul); "
        "--no-fused-norms: eager nn.LayerNorm",
    )
    ap.add_argument(
        "--fused-projection",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="HSTUConfig.fused_projection (the default): the U/V/Q/K projection's backward as one Triton pass "
        "(gr_models.modules.silu_projection); --no-fused-projection: autograd's eager backward",
    )
    ap.add_argument(
        "--fused-residual",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="HSTUConfig.fused_residual (the default): the output projection + residual as one matmul and one Triton "
        "pass each way (gr_models.modules.residual_linear), the residual's gradient added in the input norm's backward "
        "kernel; --no-fused-residual: the eager add and autograd's accumulation",
    )
    ap.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="HSTUConfig.cuda_graphs: the HSTU encoder's forward and backward replayed as CUDA graphs per bucket of "
        "padded row counts (gr_models.modules.encoder_graphs); the warm-up captures every pooled batch's bucket",
    )
    ap.add_argument(
        "--table-weights",
        choices=["fp32", "fp16"],
        default="fp32",
        help="storage precision of the item table (its rows reach the model as that dtype; the row-wise Adagrad "
        "state stays fp32)",
    )
    ap.add_argument(
        "--pipeline",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="run the steps through gr_parallel.TrainPipeline (the next batch's copy and input dist overlap this "
        "step) instead of the plain loop (--no-pipeline, the default)",
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the HSTU blocks' dense parts (ParallelizeConfig.compile_dense; tp=1 configs only)",
    )
    ap.add_argument(
        "--balance",
        default="flops",
        choices=BALANCE_MODES,
        help="how each step's global batch is split over the DP ranks (equal sequence counts): flops = "
        "gr_parallel.load_balance.balanced_partition on each sequence's HSTU training FLOPs (L^2 + c L), l2 = on "
        "L^2, none = contiguous chunks",
    )
    ap.add_argument(
        "--pool", type=int, default=8, help="distinct global batches built before the timed loop and cycled through"
    )
    ap.add_argument(
        "--pin-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pin the pool's batches on CUDA (what a DataLoader with pin_memory=True hands over)",
    )
    ap.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps first (default: --pool, so every pooled batch's shapes are seen before timing)",
    )
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=str(REPO / "docs/benchmarks/parallel"))
    ap.add_argument("--replot", action="store_true")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="print rank 0's CUDA kernel table of --profile-steps extra steps, and record their device time a step "
        "(profiled_kernel_ms) and the TFLOP/s per GPU a GPU-paced step would have (profiled_kernel_tflops_per_gpu)",
    )
    ap.add_argument(
        "--profile-steps", type=int, default=1, help="with --profile: how many consecutive steps the profile spans"
    )
    ap.add_argument(
        "--trace",
        default="",
        help="with --profile: also write the profiled steps' Chrome trace to this file (rank r > 0: FILE.rank<r>.json)",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--record", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trace and not args.profile:
        ap.error("--trace writes the profiled steps' trace: add --profile")
    if args.trace and not args.worker and Path(args.trace).resolve() == Path(args.out).with_suffix(".json").resolve():
        ap.error(f"--trace {args.trace} is the records file of --out {args.out}: the trace would overwrite it")
    if args.profile_steps < 1:
        ap.error(f"--profile-steps must be >= 1, got {args.profile_steps}")
    if args.tiny:
        args.blocks, args.dim, args.heads, args.max_len = 2, 32, 2, 64
        args.seqs_per_rank, args.num_items, args.num_negatives, args.warmup, args.steps = 4, 1000, 8, 2, 3
    if args.warmup is None:
        args.warmup = args.pool
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    for name in ("seqs_per_rank", "pool", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.qcomms == "auto":
        args.qcomms = "bf16" if args.device == "cuda" else "none"
    if args.worker:
        worker(args)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_outputs import merge_device_run, saved_runs, write_outputs

    out = Path(args.out)
    if args.replot:
        runs, records = saved_runs(out)
        write_outputs(out, runs, records, markdown, plot)
        return
    if args.compile and any(int(spec.split("x")[1]) > 1 for spec in args.configs):
        raise SystemExit(f"--compile supports tp=1 configs only (ParallelizeConfig.compile_dense), got {args.configs}")
    records = []
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    for spec in args.configs:
        gpus, tp = (int(x) for x in spec.split("x"))
        if gpus % tp:
            raise SystemExit(f"config {spec}: tp={tp} does not divide gpus={gpus}")
        records.append(run_config(args, gpus, tp, tmp / f"bench_parallel_{gpus}x{tp}.json"))
    add_scaling(records)
    device = records[0]["device"]
    meta = {
        "device": device,
        "command": "python tools/bench_parallel.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "model": f"{args.blocks} HSTU blocks, dim {args.dim}, {args.heads} heads, lengths U[1, {args.max_len}], "
        f"{args.seqs_per_rank} sequences per DP rank (DP split: {dp_split(args.balance)}; a pool of {args.pool} "
        f"global batches built before timing), {args.num_items} items, {args.num_negatives} {args.negatives} "
        "negatives (one table lookup per step), "
        f"{'gr_parallel.TrainPipeline' if args.pipeline else 'plain loop'}, embedding all-to-alls in "
        f"{'fp32' if args.qcomms == 'none' else args.qcomms}"
        f"{', HSTU blocks compiled (torch.compile)' if args.compile else ''}",
    }
    runs, all_records = merge_device_run(out, meta, records)
    write_outputs(out, runs, all_records, markdown, plot)


if __name__ == "__main__":
    main()
