"""Rank workers and the parity harness of the hybrid-parallel training tests (no tests here).

A tiny ``gr_models`` retrieval model (HSTU, 2 blocks, dim 16, 2 heads, dropout 0), jagged global batches, fixed
negatives per GLOBAL batch (a function of the step) sliced per rank, and loss = summed sampled softmax / global token
count. ``train_sharded`` trains it through ``gr_parallel.parallelize`` on the current process group;
``train_reference`` trains the same global batches on one process with the same optimizers (the static table with
torch SGD, what FBGEMM's fused EXACT_SGD computes; a dynamic table with its own fused optimizer). ``spawn`` runs a
worker on N gloo ranks over a file store (no ports). Workers live in an importable module because spawned ranks
unpickle them by module name; other helpers' tests may import the harness."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torchrec import KeyedJaggedTensor

from gr_models.data.batching import ITEM_FEATURE, SequenceBatch
from gr_models.modules.hstu import HSTUConfig
from gr_models.modules.input_embedding import DynamicItemTableConfig
from gr_models.retrieval.model import RetrievalModel, RetrievalModelConfig

NUM_ITEMS = 48
DIM = 16
HEADS = 2
MAX_LEN = 12
GLOBAL_BATCH = 8  # sequences per global batch
NEGATIVES = 6
TEMPERATURE = 0.1
STEPS = 20
TABLE_LR = 0.05
DENSE_LR = 5e-3
GRAD_CLIP = 0.5  # low enough that clipping triggers on most steps (tested)
TOL = 1e-5


@dataclass
class Scenario:
    """One parity case: the item table kind and whether the dense gradients are clipped."""

    item_table: str = "static"  # "static" (EXACT_SGD fused) or "dynamic" (gr-dynemb, its own Adam)
    # Static table: "row_wise" / "table_wise" (sharded, fused SGD) or "data_parallel" (replicated, dense AdamW).
    table_sharding: str = "row_wise"
    megatron_ddp: bool = False  # CUDA: Megatron-Core DDP as the dense gradient sync
    grad_clip: float | None = GRAD_CLIP
    steps: int = STEPS


def model_config(item_table: str) -> RetrievalModelConfig:
    return RetrievalModelConfig(
        num_items=NUM_ITEMS,
        encoder="hstu",
        embedding_dim=DIM,
        max_seq_len=MAX_LEN,
        dropout=0.0,
        hstu=HSTUConfig(num_blocks=2, num_heads=HEADS, num_time_buckets=16, attention_backend="reference"),
        item_table=item_table,  # type: ignore[arg-type]
        dynamic_item_table=DynamicItemTableConfig(capacity=256, optimizer="adam", lr=TABLE_LR, seed=3),
    )


def make_model(item_table: str, seed: int = 0) -> RetrievalModel:
    torch.manual_seed(seed)
    return RetrievalModel(model_config(item_table))


# ------------------------------------------------------------------------------------------ data
def global_sequences(step: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The global batch of ``step``: per sequence (items, timestamps, next items), jagged lengths 1..MAX_LEN."""
    g = torch.Generator().manual_seed(10_000 + step)
    out = []
    for _ in range(GLOBAL_BATCH):
        n = int(torch.randint(1, MAX_LEN + 1, (1,), generator=g))
        seq = torch.randint(0, NUM_ITEMS, (n + 1,), generator=g)
        ts = torch.cumsum(torch.randint(1, 5000, (n + 1,), generator=g), 0) + 1_600_000_000
        out.append((seq[:-1], ts[:-1], torch.stack([seq[1:], ts[1:]])))
    return out


def global_negatives(step: int, total: int) -> torch.Tensor:
    """``[total, NEGATIVES]`` negatives of the global batch's tokens (fixed per step, independent of the layout)."""
    g = torch.Generator().manual_seed(20_000 + step)
    return torch.randint(0, NUM_ITEMS, (total, NEGATIVES), generator=g)


def make_batch(seqs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> SequenceBatch:
    items = torch.cat([s[0] for s in seqs])
    lengths = torch.tensor([s[0].numel() for s in seqs], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return SequenceBatch(
        user_ids=torch.arange(len(seqs), dtype=torch.int64),
        features=KeyedJaggedTensor.from_lengths_sync(keys=[ITEM_FEATURE], values=items, lengths=lengths),
        timestamps=torch.cat([s[1] for s in seqs]),
        seq_offsets=offsets,
        max_seq_len=int(lengths.max()),
        target_items=torch.cat([s[2][0] for s in seqs]),
        target_timestamps=torch.cat([s[2][1] for s in seqs]),
    )


def local_batch(step: int, dp_rank: int, dp_size: int) -> tuple[SequenceBatch, torch.Tensor]:
    """This DP rank's slice of the global batch of ``step`` and its rows of the global negatives."""
    if GLOBAL_BATCH % dp_size:
        raise ValueError(f"the global batch of {GLOBAL_BATCH} does not split over {dp_size} DP ranks")
    seqs = global_sequences(step)
    per = GLOBAL_BATCH // dp_size
    lengths = [s[0].numel() for s in seqs]
    start = sum(lengths[: dp_rank * per])
    stop = start + sum(lengths[dp_rank * per : (dp_rank + 1) * per])
    negs = global_negatives(step, sum(lengths))[start:stop]
    return make_batch(seqs[dp_rank * per : (dp_rank + 1) * per]), negs


def loss_sum(model: nn.Module, batch: SequenceBatch, negatives: torch.Tensor) -> torch.Tensor:
    """Summed sampled-softmax loss of the batch's tokens (accidental hits masked)."""
    q = model(batch)
    targets = batch.target_items
    pos = (q * model.item_embeddings(targets)).sum(-1, keepdim=True)
    neg = torch.einsum("nd,nkd->nk", q, model.item_embeddings(negatives))
    neg = neg.masked_fill(negatives == targets.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos, neg], dim=1) / TEMPERATURE
    return F.cross_entropy(logits, torch.zeros_like(targets), reduction="sum")


# ------------------------------------------------------------------------------------------ reference
def table_weight(model: RetrievalModel, scenario: Scenario) -> nn.Parameter | None:
    """The item table's weight when a fused SGD trains it (static, sharded); None when the dense optimizer does."""
    if model.config.item_table != "static" or scenario.table_sharding == "data_parallel":
        return None
    return model.input_embedding.item_embeddings.embeddings["item_table"].weight


def train_reference(scenario: Scenario, seed: int = 0) -> tuple[RetrievalModel, list[float], list[float]]:
    """Single-process training on the global batches: (model, losses, dense grad norms before clipping)."""
    model = make_model(scenario.item_table, seed)
    table = table_weight(model, scenario)
    dense = [p for p in model.parameters() if p is not table]
    opt = torch.optim.AdamW(dense, lr=DENSE_LR)
    table_opt = torch.optim.SGD([table], lr=TABLE_LR) if table is not None else None
    losses, norms = [], []
    for step in range(scenario.steps):
        batch, negs = local_batch(step, 0, 1)
        loss = loss_sum(model, batch, negs) / batch.target_items.numel()
        loss.backward()
        if scenario.grad_clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(dense, scenario.grad_clip)))
        opt.step()
        opt.zero_grad()
        if table_opt is not None:
            table_opt.step()
            table_opt.zero_grad()
        losses.append(float(loss.detach()))
    return model, losses, norms


# ------------------------------------------------------------------------------------------ sharded
def parallelize_config(scenario: Scenario):
    from torchrec.distributed.planner import ParameterConstraints

    from gr_parallel.dense import DenseOptimizerConfig
    from gr_parallel.parallelize import EmbeddingOptimizerConfig, ParallelizeConfig

    constraints = {}
    if scenario.item_table == "static":
        constraints["item_table"] = ParameterConstraints(sharding_types=[scenario.table_sharding])
    return ParallelizeConfig(
        constraints=constraints,
        embedding_optimizer=EmbeddingOptimizerConfig("sgd", lr=TABLE_LR),
        dense_optimizer=DenseOptimizerConfig(lr=DENSE_LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
        grad_clip=scenario.grad_clip,
        megatron_ddp=scenario.megatron_ddp,
    )


def train_sharded(ctx, scenario: Scenario, seed: int = 0):
    """Trains through ``parallelize`` on this rank's slices: (ParallelModel, global losses, grad norms)."""
    from gr_parallel.dense import global_count
    from gr_parallel.parallelize import parallelize

    pm = parallelize(make_model(scenario.item_table, seed), ctx, parallelize_config(scenario))
    check_plan(pm, scenario)
    losses, norms = [], []
    for step in range(scenario.steps):
        batch, negs = local_batch(step, ctx.dp_rank, ctx.dp_size)
        count = global_count(batch.target_items.numel(), ctx)
        loss = loss_sum(pm.module, batch.to(ctx.device), negs.to(ctx.device)) / count
        loss.backward()
        norm = pm.step()
        if norm is not None:
            norms.append(float(norm))
        total = loss.detach().clone()
        dist.all_reduce(total, group=ctx.dp_group)
        losses.append(float(total))
    return pm, losses, norms


def check_plan(pm, scenario: Scenario) -> None:
    """The item table is planned as the scenario asks (a replicated table is left out of the plan)."""
    from gr_dynemb.distributed import DYNAMIC_KERNEL

    entries = {name: ps for module_plan in pm.plan.plan.values() for name, ps in module_plan.items()}
    if scenario.item_table == "static" and scenario.table_sharding == "data_parallel":
        assert entries == {}, entries
        return
    ps = entries["item_table"]
    if scenario.item_table == "dynamic":
        assert (ps.sharding_type, ps.compute_kernel) == ("row_wise", DYNAMIC_KERNEL), ps
    else:
        assert (ps.sharding_type, ps.compute_kernel) == (scenario.table_sharding, "fused"), ps


def item_rows(model: nn.Module) -> torch.Tensor:
    """Every item's raw embedding row (a collective on a sharded model: every rank asks for all rows)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        device = model.input_embedding.position_embeddings.weight.device
        rows = model.input_embedding.embed_ids(torch.arange(NUM_ITEMS, device=device)).cpu().clone()
    model.train(was_training)
    return rows


def full_dense_state(pm, ctx) -> dict[str, torch.Tensor]:
    """The dense parameters under their single-device names and shapes (TP shards gathered)."""
    names = {id(p) for p in pm.dense_params}
    if ctx.tp_size > 1:
        from gr_parallel.tensor_parallel import full_dense_state_dict

        state = full_dense_state_dict(pm.module, ctx)
        return {k: v.detach().cpu() for k, v in state.items()}
    return {n: p.detach().cpu() for n, p in pm.module.named_parameters() if id(p) in names}


def compare(
    pm, ctx, scenario: Scenario, losses: list[float], norms: list[float], tol: float = TOL
) -> dict[str, float] | None:
    """Max abs differences (losses, grad norms, dense params, item rows) against the single-process reference,
    each asserted within ``TOL``. Every rank gathers the full model and checks it equals rank 0's (DP replicas
    agree); rank 0 alone trains the reference (it is the same on every rank) and returns the differences."""
    initial = make_model(scenario.item_table)
    table = table_weight(initial, scenario)
    names = [n for n, p in initial.named_parameters() if p is not table]  # the single-device dense parameters
    state = full_dense_state(pm, ctx)
    missing = sorted(set(names) - set(state))
    assert not missing, f"parameters missing from the sharded model's dense state: {missing}"
    got = {n: state[n] for n in names}
    rows = item_rows(pm.module)
    mine = torch.cat([got[n].reshape(-1) for n in names] + [rows.reshape(-1), torch.tensor(losses + norms)])
    first = mine.to(ctx.device)
    dist.broadcast(first, src=0)
    spread = float((mine - first.cpu()).abs().max())
    assert spread <= tol, f"rank {ctx.rank}'s model differs from rank 0's by {spread}"
    if ctx.rank != 0:
        return None
    ref, ref_losses, ref_norms = train_reference(scenario)
    diffs = {"loss": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)), "ranks": spread}
    if scenario.grad_clip is not None:
        diffs["grad_norm"] = max(abs(a - b) for a, b in zip(norms, ref_norms, strict=True))
        clipped = sum(n > scenario.grad_clip for n in ref_norms)
        assert clipped >= scenario.steps // 2, f"clipping triggered on only {clipped} of {scenario.steps} steps"
    want = {n: p.detach() for n, p in ref.named_parameters() if n in got}
    diffs["dense"] = max(float((got[n] - want[n]).abs().max()) for n in want)
    moved = max(float((want[n] - p.detach()).abs().max()) for n, p in initial.named_parameters() if n in want)
    assert moved > 1e-3, f"the dense parameters barely moved ({moved}): the comparison would be vacuous"
    ref_rows = item_rows(ref)
    diffs["rows"] = float((rows - ref_rows).abs().max())
    rows_moved = float((ref_rows - item_rows(initial)).abs().max())
    assert rows_moved > 1e-3, f"the item rows barely moved ({rows_moved}): the comparison would be vacuous"
    assert not any(math.isnan(x) for x in losses)
    for k, v in diffs.items():
        assert v <= tol, f"({ctx.tp_size=}, {ctx.dp_size=}, {scenario}): {k} differs by {v}"
    return diffs


# ------------------------------------------------------------------------------------------ spawning
def spawn(world_size: int, worker: Callable, tmp: Path, *args: object, backend: str = "gloo") -> None:
    """Runs ``worker(ctx, tmp, *args)`` on ``world_size`` ranks (a failure in any rank fails); the first of
    ``args``, when an int, is the TP size. ``backend="nccl"``: rank r on GPU r."""
    mp.spawn(_entry, args=(world_size, worker, str(tmp), args, backend), nprocs=world_size, join=True)


def _entry(rank: int, world_size: int, worker: Callable, tmp: str, args: tuple, backend: str = "gloo") -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    tp = int(args[0]) if args and isinstance(args[0], int) else 1
    if backend == "nccl":
        os.environ["LOCAL_RANK"] = str(rank)
        torch.cuda.set_device(rank)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity: no TF32 matmuls
        torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=rank, world_size=world_size)
    import gr_parallel.context as context

    try:
        ctx = context.initialize(tp=tp, backend=backend, timeout_s=120.0)
        worker(ctx, Path(tmp), *args)
    finally:
        context.destroy()
        dist.destroy_process_group()


def worker_parity(
    ctx,
    tmp: Path,
    tp: int,
    item_table: str,
    table_sharding: str = "row_wise",
    tol: float = TOL,
    megatron_ddp: bool = False,
) -> None:
    """Sharded training equals single-process training (on CUDA the reference still runs on the CPU); rank 0 writes
    the measured differences (diffs.pt)."""
    scenario = Scenario(item_table=item_table, table_sharding=table_sharding, megatron_ddp=megatron_ddp)
    pm, losses, norms = train_sharded(ctx, scenario)
    diffs = compare(pm, ctx, scenario, losses, norms, tol)
    if diffs is not None:
        torch.save(diffs, tmp / "diffs.pt")


# ------------------------------------------------------------------------------------------ dense unit workers
def _fake_params(seed: int, rank_seed: int) -> list[nn.Parameter]:
    """Parameters of mixed shapes and dtypes, with rank-dependent gradients: a fp64 one, one without a gradient on
    odd ranks, one with a sparse gradient."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (7,), (4, 4, 2), (1,), (9, 2)]
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    params.append(nn.Parameter(torch.randn(6, generator=g, dtype=torch.float64)))
    gr = torch.Generator().manual_seed(rank_seed)
    for i, p in enumerate(params):
        if i == 3 and rank_seed % 2:
            continue  # no gradient on this rank
        p.grad = torch.randn(p.shape, generator=gr, dtype=p.dtype)
    sparse = nn.Parameter(torch.zeros(6, 3))
    idx = torch.tensor([[rank_seed % 6, (rank_seed + 2) % 6]])
    sparse.grad = torch.sparse_coo_tensor(idx, torch.randn(2, 3, generator=gr), (6, 3))
    params.append(sparse)
    return params


def worker_grad_sync(ctx, tmp: Path, tp: int) -> None:
    """The bucketed sync (buckets of a few elements, so several per dtype) equals one all-reduce per parameter over
    the DP group; ranks of other DP groups are not mixed in; broadcast_parameters copies the first DP rank's values."""
    from gr_parallel.dense import DenseGradSync

    params = _fake_params(0, rank_seed=ctx.rank)
    expected = []
    for p in _fake_params(0, rank_seed=ctx.rank):
        g = torch.zeros_like(p) if p.grad is None else p.grad.to_dense()
        dist.all_reduce(g, group=ctx.dp_group)
        expected.append(g)
    sync = DenseGradSync(params, ctx, bucket_mb=40 / 2**20)  # 40 bytes: many buckets
    assert len(sync.buckets) > 3, len(sync.buckets)
    sync.sync()
    for i, (p, want) in enumerate(zip(params, expected, strict=True)):
        assert not p.grad.is_sparse
        torch.testing.assert_close(p.grad, want, rtol=0, atol=0, msg=f"param {i}")
    # Hand check of the group: the sum over the ranks sharing this rank's TP index.
    first = params[0].grad
    manual = sum(_fake_params(0, rank_seed=r)[0].grad for r in ctx.dp_ranks)
    torch.testing.assert_close(first, manual, rtol=1e-6, atol=1e-6)
    one = DenseGradSync(_fake_params(0, rank_seed=ctx.rank), ctx)  # default buckets: one per dtype
    assert len(one.buckets) == 3, [[p.dtype for p in b] for b in one.buckets]  # fp32, fp64, fp32 (order kept)
    # broadcast: every DP rank ends with the first DP rank's values
    mine = [nn.Parameter(torch.full((3,), float(ctx.rank)))]
    DenseGradSync(mine, ctx).broadcast_parameters()
    assert torch.equal(mine[0].detach(), torch.full((3,), float(ctx.dp_ranks[0]))), mine[0]


def _tp_model(ctx, seed: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(full parameters with gradients, this rank's parameters): the first two are split along dim 0 over the TP
    group and marked ``tensor_model_parallel``, the rest replicated. Gradients are a function of the DP rank (the
    full model of one DP rank is its TP group's shards)."""
    g = torch.Generator().manual_seed(seed)
    full = [nn.Parameter(torch.randn(s, generator=g)) for s in [(8, 3), (4,), (5, 2), (3,)]]
    gr = torch.Generator().manual_seed(seed + 1)
    for p in full:
        p.grad = torch.randn(p.shape, generator=gr) * 3
    local = []
    for i, p in enumerate(full):
        if i < 2:
            n = p.shape[0] // ctx.tp_size
            q = nn.Parameter(p.detach()[ctx.tp_rank * n : (ctx.tp_rank + 1) * n].clone())
            q.grad = p.grad[ctx.tp_rank * n : (ctx.tp_rank + 1) * n].clone()
            q.tensor_model_parallel = True
            q.partition_dim = 0
        else:
            q = nn.Parameter(p.detach().clone())
            q.grad = p.grad.clone()
        local.append(q)
    return full, local


def worker_clip(ctx, tmp: Path, tp: int) -> None:
    """clip_grad_norm_ across TP (shards summed over the TP group, replicated parameters once) equals torch's on the
    full model, for the L2 and the inf norm, clipping and not clipping."""
    from gr_parallel.dense import clip_grad_norm_

    for norm_type in (2.0, math.inf):
        for max_norm in (0.5, 1e6):
            full, local = _tp_model(ctx, 5)
            want = torch.nn.utils.clip_grad_norm_(full, max_norm, norm_type=norm_type)
            got = clip_grad_norm_(local, max_norm, ctx, norm_type=norm_type)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            for i, (f, q) in enumerate(zip(full, local, strict=True)):
                expected = f.grad
                if i < 2:
                    n = f.shape[0] // ctx.tp_size
                    expected = f.grad[ctx.tp_rank * n : (ctx.tp_rank + 1) * n]
                torch.testing.assert_close(q.grad, expected, rtol=1e-6, atol=1e-7, msg=f"{norm_type} {max_norm} {i}")


def worker_global_count(ctx, tmp: Path, tp: int) -> None:
    """global_count sums over the DP group only (the TP ranks of a group share a batch)."""
    from gr_parallel.dense import global_count

    local = 10 + ctx.dp_rank  # equal within a TP group
    got = global_count(local, ctx)
    assert got.dtype == torch.int64 and int(got) == sum(10 + d for d in range(ctx.dp_size)), got
    got_t = global_count(torch.tensor(float(local)), ctx)
    assert float(got_t) == float(sum(10 + d for d in range(ctx.dp_size)))
    assert float(global_count(2.5, ctx)) == 2.5 * ctx.dp_size


def worker_dense_units(ctx, tmp: Path, tp: int) -> None:
    """The dense unit checks on one layout (one spawn: rank start-up dominates these tests' time)."""
    worker_grad_sync(ctx, tmp, tp)
    worker_clip(ctx, tmp, tp)
    worker_global_count(ctx, tmp, tp)


def worker_bf16(ctx, tmp: Path, tp: int) -> None:
    """bf16 mixed precision (``ParallelizeConfig.bf16``): the model trains under autocast with fp32 parameters,
    gradients and optimizer, and its losses stay within bf16 rounding of the fp32 single-process run."""
    from gr_parallel.dense import global_count
    from gr_parallel.parallelize import parallelize

    scenario = Scenario(steps=5)
    config = parallelize_config(scenario)
    config.bf16 = True
    pm = parallelize(make_model("static"), ctx, config)
    _, ref_losses, _ = train_reference(scenario)
    saw_bf16 = []
    linear = next(m for m in pm.module.encoder.modules() if isinstance(m, nn.Linear))  # the U/V/Q/K projection
    handle = linear.register_forward_hook(lambda m, a, out: saw_bf16.append(out.dtype))
    for step in range(scenario.steps):
        batch, negs = local_batch(step, ctx.dp_rank, ctx.dp_size)
        count = global_count(batch.target_items.numel(), ctx)
        with pm.autocast():
            loss = loss_sum(pm.module, batch.to(ctx.device), negs.to(ctx.device)) / count
        loss.backward()
        grads = [p.grad for p in pm.dense_params if p.grad is not None]
        assert grads and all(g.dtype == torch.float32 for g in grads)
        pm.step()
        total = loss.detach().float().clone()
        dist.all_reduce(total, group=ctx.dp_group)
        assert abs(float(total) - ref_losses[step]) <= 3e-2 * abs(ref_losses[step]), (step, float(total))
    handle.remove()
    assert saw_bf16 and all(d == torch.bfloat16 for d in saw_bf16), saw_bf16
    assert all(p.dtype == torch.float32 for p in pm.dense_params)
