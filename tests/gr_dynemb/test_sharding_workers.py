"""Rank workers and shared pieces of the multi-rank sharding tests (no tests here: test_sharding.py runs them).

A toy model mixing a static and a dynamic table, its data, an unsharded reference trained the same way, the rank
workers, and a spawn helper (gloo, or NCCL with one GPU per rank, over a file store, so no ports). The workers live in
an importable module because spawned ranks unpickle them by module name. Workers take ``device``: "cpu" (gloo, the
CPU tests) or "cuda" (NCCL, test_sharding_nccl.py: each rank on its own GPU, the reference still on the CPU)."""

from __future__ import annotations

import faulthandler
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from gr_dynemb import DynamicEmbeddingCollection, DynamicTable, FusedOptimizerConfig, InitializerConfig
from gr_dynemb.distributed import DynamicParameterConstraints, DynamicTableOptions

DIM = 4
STATIC_ROWS = 24
GLOBAL_BATCH = 8
# Dynamic ids: a pool of large, scattered int64 keys (no static table could index them) that repeat across batches.
POOL = torch.randint(-(2**62), 2**62, (40,), generator=torch.Generator().manual_seed(7))


def tables() -> list[EmbeddingConfig]:
    return [
        EmbeddingConfig(name="static", embedding_dim=DIM, num_embeddings=STATIC_ROWS, feature_names=["s"]),
        # num_embeddings of a dynamic table only sizes the planner's estimate; its rows live in the hash table.
        EmbeddingConfig(name="dyn", embedding_dim=DIM, num_embeddings=64, feature_names=["d", "d_clicked"]),
    ]


def dynamic_options(device: str = "cpu") -> DynamicTableOptions:
    return DynamicTableOptions(capacity=256, initializer=InitializerConfig("normal", std=0.1, seed=3), device=device)


def constraints(static_kernel: str = "fused", static_sharding: str = "row_wise", device: str = "cpu") -> dict:
    """The plan constraints; ``device="cuda"`` asks for a CUDA dynamic table without an index: the sharder puts each
    shard on its rank's GPU."""
    from torchrec.distributed.planner import ParameterConstraints

    return {
        "static": ParameterConstraints(sharding_types=[static_sharding], compute_kernels=[static_kernel]),
        "dyn": DynamicParameterConstraints(dynamic=dynamic_options(device)),
    }


def batch(step: int, lo: int = 0, hi: int = GLOBAL_BATCH) -> KeyedJaggedTensor:
    """Samples [lo, hi) of the global batch of ``step``: 0-3 static ids, 0-3 ids of each dynamic feature."""
    g = torch.Generator().manual_seed(1000 + step)
    lengths = torch.randint(0, 4, (3, GLOBAL_BATCH), generator=g)
    static = torch.randint(0, STATIC_ROWS, (int(lengths[0].sum()),), generator=g)
    dyn = POOL[torch.randint(0, POOL.numel(), (int(lengths[1:].sum()),), generator=g)]
    per_feature = [static, dyn[: int(lengths[1].sum())], dyn[int(lengths[1].sum()) :]]
    values, lens = [], []
    for f in range(3):
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths[f].cumsum(0)])
        values.append(per_feature[f][offsets[lo] : offsets[hi]])
        lens.append(lengths[f][lo:hi])
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["s", "d", "d_clicked"], values=torch.cat(values), lengths=torch.cat(lens)
    )


def all_ids_batch() -> KeyedJaggedTensor:
    """One sample holding every static row and every pool key (plus keys never trained)."""
    unseen = torch.tensor([5, -9, 2**40])
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["s", "d", "d_clicked"],
        values=torch.cat([torch.arange(STATIC_ROWS), POOL, unseen]),
        lengths=torch.tensor([STATIC_ROWS, POOL.numel(), unseen.numel()]),
    )


def loss_of(out: dict) -> torch.Tensor:
    """A quadratic loss whose target depends on the feature and position, so gradients depend on the rows."""
    total = torch.zeros((), device=out["s"].values().device)
    for k, name in enumerate(("s", "d", "d_clicked")):
        v = out[name].values()
        target = torch.linspace(-0.5, 0.5, DIM, device=v.device) * (k + 1)
        total = total + ((v - target) ** 2).sum()
    return total


def make_model(seed: int = 0) -> EmbeddingCollection:
    torch.manual_seed(seed)
    return EmbeddingCollection(tables=tables(), device=torch.device("cpu"))


class RowSparseAdam(torch.optim.Optimizer):
    """Adam as FBGEMM's fused CUDA kernel runs it on a table: only the rows in the batch (the sparse gradient's rows)
    update their moments and weights, bias-corrected with the global step count ``t`` and eps added to
    ``sqrt(v / (1 - beta2^t))`` (torch's SparseAdam adds it to ``sqrt(v)``)."""

    def __init__(self, params, lr: float, beta1: float, beta2: float, eps: float) -> None:
        super().__init__(params, {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, b1, b2, eps = group["lr"], group["beta1"], group["beta2"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["t"] += 1
                grad = p.grad.coalesce()
                rows, g = grad.indices()[0], grad.values()
                m = state["m"][rows] * b1 + (1 - b1) * g
                v = state["v"][rows] * b2 + (1 - b2) * g * g
                state["m"][rows], state["v"][rows] = m, v
                t = state["t"]
                p[rows] -= lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)


class Reference(nn.Module):
    """The same model unsharded: the static table as a sparse ``nn.Embedding`` with torch's optimizer (exact SGD or
    Adagrad: what FBGEMM's fused CPU kernel computes; Adam as FBGEMM's CUDA kernel computes it) and the dynamic table
    as a ``DynamicEmbeddingCollection``."""

    def __init__(
        self, static_weight: torch.Tensor, static_opt: FusedOptimizerConfig, dynamic_opt: FusedOptimizerConfig
    ) -> None:
        super().__init__()
        self.static = nn.Embedding.from_pretrained(static_weight.clone(), freeze=False, sparse=True)
        opts = dynamic_options()
        self.dynamic = DynamicEmbeddingCollection(
            [DynamicTable("dyn", ["d", "d_clicked"], opts.embedding_config(DIM, dynamic_opt))]
        )
        params = self.static.parameters()
        if static_opt.kind == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=static_opt.lr)
        elif static_opt.kind == "adagrad":
            self.opt = torch.optim.Adagrad(params, lr=static_opt.lr, eps=static_opt.eps)
        elif static_opt.kind == "adam":
            self.opt = RowSparseAdam(
                params, lr=static_opt.lr, beta1=static_opt.beta1, beta2=static_opt.beta2, eps=static_opt.eps
            )
        else:
            raise ValueError(f"no reference for a static {static_opt.kind} table")

    def forward(self, kjt: KeyedJaggedTensor) -> dict:
        from torchrec import JaggedTensor

        jts = kjt.to_dict()
        out = dict(self.dynamic(KeyedJaggedTensor.from_jt_dict({f: jts[f] for f in ("d", "d_clicked")})))
        out["s"] = JaggedTensor(values=self.static(jts["s"].values()), lengths=jts["s"].lengths())
        return out

    def train_step(self, kjt: KeyedJaggedTensor, world_size: int) -> float:
        """One step on the global batch. Sharded tables see the mean over ranks of the ranks' gradients (TorchRec's
        gradient division), i.e. the gradient of the global loss / world_size."""
        self.opt.zero_grad()
        loss = loss_of(self(kjt))
        (loss / world_size).backward()
        self.opt.step()
        return float(loss.detach())


def fused_params(optimizer: FusedOptimizerConfig) -> dict:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    kind = {"sgd": EmbOptimType.EXACT_SGD, "adagrad": EmbOptimType.EXACT_ADAGRAD, "adam": EmbOptimType.ADAM}[
        optimizer.kind
    ]
    return {
        "optimizer": kind,
        "learning_rate": optimizer.lr,
        "eps": optimizer.eps,
        "beta1": optimizer.beta1,
        "beta2": optimizer.beta2,
    }


def spawn(world_size: int, worker: Callable, tmp: Path, *args: object, backend: str = "gloo") -> None:
    """Runs ``worker(rank, world_size, tmp, *args)`` on ``world_size`` ranks of ``backend``; a failure in any rank
    fails. With "nccl" rank r runs on GPU r (its current CUDA device)."""
    # A store file of its own: the ranks leave without running the FileStore's cleanup (see _entry), and a later
    # group rendezvousing on an earlier group's file would read that group's stale peer addresses.
    store = tmp / f"store-{uuid.uuid4().hex}"
    mp.spawn(_entry, args=(world_size, worker, str(tmp), args, backend, str(store)), nprocs=world_size, join=True)


def _entry(rank: int, world_size: int, worker: Callable, tmp: str, args: tuple, backend: str, store: str) -> None:
    faulthandler.enable(all_threads=True)  # a rank killed by a signal prints where every thread was
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        worker(rank, world_size, Path(tmp), *args)
    finally:
        dist.destroy_process_group()
    # The rank's work is done and checked: leave without interpreter finalisation, where objects still holding the
    # gloo process group (TorchRec's sharding environment) are torn down in arbitrary order. On the 2-core CI machine
    # a rank occasionally died with "terminate called without an active exception" (SIGABRT); no code of ours owns a
    # C++ thread that outlives a call, so teardown is the likely place (faulthandler above names it if not).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------------------------------------- rank workers
STEPS = 4
LR = 0.05


def optimizers(kind: str) -> tuple[FusedOptimizerConfig, FusedOptimizerConfig]:
    """(static, dynamic) optimizers of a scenario. FBGEMM's CPU kernel has no Adam, so with ``kind="adam"`` the
    static table trains with exact Adagrad and the dynamic table with its own Adam (DynamicTableOptions.optimizer);
    with ``"sgd"`` both take exact SGD from the sharder's fused_params; ``"adam_tbe"`` (CUDA: FBGEMM's GPU kernel has
    Adam) trains both with Adam, the static table through fused_params, the dynamic one through its options."""
    if kind == "sgd":
        return FusedOptimizerConfig("sgd", lr=LR), FusedOptimizerConfig("sgd", lr=LR)
    if kind == "adam_tbe":
        return FusedOptimizerConfig("adam", lr=LR), FusedOptimizerConfig("adam", lr=LR)
    return FusedOptimizerConfig("adagrad", lr=LR), FusedOptimizerConfig("adam", lr=LR)


def local_device(device: str) -> torch.device:
    """The torch device of this rank for a worker's ``device`` argument ("cpu", or "cuda": the rank's own GPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)


def tolerances(device: str) -> tuple[dict, dict]:
    """(loss, lookup) tolerances of sharded vs reference training. On the CPU both sides run the same fp32 code in
    different orders. On CUDA the reference still runs on the CPU while the sharded model sums duplicate-id gradients
    in GPU order and FBGEMM's and the CUDA table's Adam use GPU sqrt/pow, so the lookups get 5e-6 absolute instead of
    1e-6: perturbing this workload's static-table gradients by 1e-6 relative noise (ten fp32 ulps) moves its rows
    after the four Adam steps by at most 8e-8 (measured on the CPU in fp64), so 5e-6 leaves a wide margin and still
    catches any real difference (one missed or doubled Adam step moves a row by about lr = 0.05)."""
    loss = {"rtol": 1e-5, "atol": 1e-5}
    return loss, {"rtol": 1e-5, "atol": 5e-6 if device == "cuda" else 1e-6}


def shard_model(model: nn.Module, world_size: int, static_opt, cons: dict, plan: object = None, device: str = "cpu"):
    """(DMP over ``model`` with the dynamic sharder on the current process group, its plan); ``plan=None`` plans."""
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.planner import Topology
    from torchrec.distributed.types import ShardingEnv

    from gr_dynemb.distributed import DynamicEmbeddingCollectionSharder, DynamicEmbeddingShardingPlanner

    sharders = [DynamicEmbeddingCollectionSharder(fused_params=fused_params(static_opt))]
    if plan is None:
        planner = DynamicEmbeddingShardingPlanner(
            Topology(world_size=world_size, compute_device=device), constraints=cons
        )
        plan = planner.collective_plan(model, sharders, dist.group.WORLD)
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        plan=plan,
        sharders=sharders,
        device=local_device(device),
    )
    return dmp, plan


def build_sharded(
    world_size: int, kind: str, seed: int = 0, plan: object = None, device: str = "cpu"
) -> tuple[nn.Module, EmbeddingCollection, object]:
    """(DMP model, the unsharded EC it was built from, plan) on the current process group; ``plan=None`` plans."""
    static_opt, dynamic_opt = optimizers(kind)
    model = make_model(seed)
    unsharded = make_model(seed)
    cons = constraints(device=device)
    if kind != "sgd":
        cons["dyn"].dynamic.optimizer = dynamic_opt
    dmp, plan = shard_model(model, world_size, static_opt, cons, plan, device)
    return dmp, unsharded, plan


def dumped_rows(directory: Path) -> int:
    from gr_dynemb.checkpoint import read_dump

    return sum(int(read_dump(p)["keys"].numel()) for p in (directory / "dyn").glob("*.pt"))


def probe(module: nn.Module, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Lookups of ``all_ids_batch`` (fed on ``device``), returned on the CPU."""
    module.eval()
    with torch.no_grad():
        out = module(all_ids_batch().to(local_device(device)))
    module.train()
    return {f: out[f].values().cpu().clone() for f in ("s", "d", "d_clicked")}


def train_and_compare(rank: int, world_size: int, kind: str, device: str = "cpu") -> tuple[nn.Module, object]:
    """Trains the sharded model (on ``device``) and the unsharded reference (on the CPU) on the same global batches;
    asserts equal losses every step and equal lookups (every static row, every trained and some unseen dynamic ids)
    at the end."""
    from gr_dynemb.distributed import DYNAMIC_KERNEL

    dmp, unsharded, plan = build_sharded(world_size, kind, device=device)
    kernels = {name: ps.compute_kernel for name, ps in plan.plan[""].items()}
    assert kernels == {"static": "fused", "dyn": DYNAMIC_KERNEL}, kernels
    assert dmp.module.dynamic["dyn"].table.device == local_device(device), "the shard is not on this rank's device"
    static_opt, dynamic_opt = optimizers(kind)
    ref = Reference(unsharded.embeddings["static"].weight.detach(), static_opt, dynamic_opt)
    loss_tol, lookup_tol = tolerances(device)
    per_rank = GLOBAL_BATCH // world_size
    for step in range(STEPS):
        loss = loss_of(dmp(batch(step, rank * per_rank, (rank + 1) * per_rank).to(local_device(device))))
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        expected = ref.train_step(batch(step), world_size)
        torch.testing.assert_close(total.item(), expected, **loss_tol, msg=f"step {step} loss")
    got, want = probe(dmp, device), probe(ref)
    for f in got:
        torch.testing.assert_close(got[f], want[f], **lookup_tol, msg=f"lookups of {f}")
    return dmp, plan


def worker_train_state_dict(rank: int, world_size: int, tmp: Path, kind: str, device: str = "cpu") -> None:
    """Training parity, a state_dict round trip into a freshly sharded model (same world size), parity of a model
    nesting the collection next to a DDP-wrapped dense layer, and parity under TorchRec's train pipeline."""
    dmp, plan = train_and_compare(rank, world_size, kind, device)
    state = dmp.state_dict()
    dyn_keys = [k for k in state if k.startswith("dynamic.dyn.")]
    assert sorted(k.rsplit(".", 1)[1] for k in dyn_keys) == ["step", "table_keys", "table_scores", "table_values"]
    from gr_dynemb import owner_ranks

    assert bool((owner_ranks(state["dynamic.dyn.table_keys"], world_size) == rank).all()), "a shard holds others' keys"
    fresh, _, _ = build_sharded(world_size, kind, seed=1, plan=plan, device=device)  # other static init, empty table
    fresh.load_state_dict(state)
    want, got = probe(dmp, device), probe(fresh, device)
    for f in got:
        torch.testing.assert_close(got[f], want[f], msg=f"state_dict round trip of {f}")
    nested_dense_matches(rank, world_size, device)
    train_pipeline_matches(rank, world_size, device)


def worker_train_dump(rank: int, world_size: int, tmp: Path, kind: str, device: str = "cpu") -> None:
    """Training parity, then per-rank dumps (``tmp/dumps``), state dicts and the expected lookups (rank 0)."""
    from gr_dynemb.distributed import dump_sharded

    dmp, _ = train_and_compare(rank, world_size, kind, device)
    dump_sharded(dmp, tmp / "dumps")  # the whole DMP model: its dynamic tables are found inside
    torch.save({k: v for k, v in dmp.state_dict().items() if k.startswith("dynamic.")}, tmp / f"state{rank}.pt")
    lookups = probe(dmp, device)  # a collective: every rank takes part
    if rank == 0:
        torch.save(lookups, tmp / "expected.pt")


def worker_train_load(rank: int, world_size: int, tmp: Path, kind: str, device: str = "cpu") -> None:
    """Training parity on this world size; then the dumps (and state dicts) of another world size, loaded into a
    fresh model here, give the lookups recorded there."""
    from gr_dynemb.distributed import load_sharded

    _, plan = train_and_compare(rank, world_size, kind, device)
    expected = torch.load(tmp / "expected.pt")
    fresh, _, _ = build_sharded(world_size, kind, seed=1, plan=plan, device=device)
    loaded = load_sharded(fresh.module, tmp / "dumps")
    counts = torch.tensor([loaded["dyn"]], device=local_device(device))
    dist.all_reduce(counts)
    assert int(counts) == dumped_rows(tmp / "dumps"), "every dumped row is loaded by exactly one rank"
    got = probe(fresh, device)
    for f in ("d", "d_clicked"):
        torch.testing.assert_close(got[f], expected[f], msg=f"re-sharded lookups of {f}")
    # state_dict path: every old rank's rows offered to every new rank; each keeps the keys it owns.
    old = [torch.load(p) for p in sorted(tmp.glob("state*.pt"))]
    merged = {
        n: torch.cat([s[f"dynamic.dyn.{n}"] for s in old]) for n in ("table_keys", "table_values", "table_scores")
    }
    merged["step"] = old[0]["dynamic.dyn.step"]
    fresh.module.dynamic["dyn"].load_state_dict(merged)  # replaces the rows loaded from the dumps
    got = probe(fresh, device)
    for f in ("d", "d_clicked"):
        torch.testing.assert_close(got[f], expected[f], msg=f"re-sharded state_dict lookups of {f}")


class Tower(nn.Module):
    """The collection nested in a model with a dense layer: DMP shards ``ec`` and wraps ``proj`` in DDP."""

    def __init__(self, ec: nn.Module) -> None:
        super().__init__()
        self.ec = ec
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        from torchrec import JaggedTensor

        out = self.ec(kjt)  # sharded: a LazyAwaitable of the dict (index it by name, as with TorchRec's own)
        features = ("s", "d", "d_clicked")
        return loss_of({f: JaggedTensor(values=self.proj(out[f].values()), lengths=out[f].lengths()) for f in features})


def nested_dense_matches(rank: int, world_size: int, device: str = "cpu") -> None:
    """A model holding the mixed collection next to a dense layer trains like its unsharded twin: the planner finds
    the collection at ``ec``, DDP averages the dense gradients, the tables see the mean of the ranks' gradients."""

    from gr_dynemb.distributed import DYNAMIC_KERNEL

    static_opt, dynamic_opt = optimizers("sgd")
    torch.manual_seed(5)
    model = Tower(make_model(3))
    ref_model = Tower(Reference(model.ec.embeddings["static"].weight.detach(), static_opt, dynamic_opt))
    ref_model.proj.load_state_dict(model.proj.state_dict())
    dmp, plan = shard_model(model, world_size, static_opt, constraints(device=device), device=device)
    assert plan.plan["ec"]["dyn"].compute_kernel == DYNAMIC_KERNEL
    dense = torch.optim.SGD([p for n, p in dmp.named_parameters() if "proj" in n], lr=LR)
    ref_dense = torch.optim.SGD(ref_model.proj.parameters(), lr=LR)
    per_rank = GLOBAL_BATCH // world_size
    for step in range(STEPS):
        loss = dmp(batch(step, rank * per_rank, (rank + 1) * per_rank).to(local_device(device)))
        dense.zero_grad()
        loss.backward()
        dense.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        ref_dense.zero_grad()
        ref_model.ec.opt.zero_grad()
        ref_loss = ref_model(batch(step))
        (ref_loss / world_size).backward()
        ref_dense.step()
        ref_model.ec.opt.step()
        loss_tol, _ = tolerances(device)
        torch.testing.assert_close(total.item(), ref_loss.item(), **loss_tol, msg=f"step {step} loss")


class PipelineBatch(Pipelineable):
    """A batch TorchRec's train pipeline can move and stream-record."""

    def __init__(self, kjt: KeyedJaggedTensor) -> None:
        self.kjt = kjt

    def to(self, device: torch.device, non_blocking: bool = False) -> PipelineBatch:
        return PipelineBatch(self.kjt.to(device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        self.kjt.record_stream(stream)


class PipelineModel(nn.Module):
    def __init__(self, ec: nn.Module) -> None:
        super().__init__()
        self.ec = ec

    def forward(self, b: PipelineBatch) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.ec(b.kjt)
        loss = loss_of({f: out[f] for f in ("s", "d", "d_clicked")})
        return loss, loss.detach()


def train_pipeline_matches(rank: int, world_size: int, device: str = "cpu") -> None:
    """TorchRec's TrainPipelineSparseDist (input dist of batch i+1 while batch i trains; on CUDA on its own streams)
    runs the mixed collection and trains like the unsharded reference."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    static_opt, dynamic_opt = optimizers("sgd")
    model = PipelineModel(make_model(4))
    ref = Reference(model.ec.embeddings["static"].weight.detach(), static_opt, dynamic_opt)
    dmp, _ = shard_model(model, world_size, static_opt, constraints(device=device), device=device)
    # The model has no dense parameters; the pipeline still wants an optimizer to step.
    pipeline = TrainPipelineSparseDist(
        dmp, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR), local_device(device)
    )
    per_rank = GLOBAL_BATCH // world_size
    batches = iter([PipelineBatch(batch(s, rank * per_rank, (rank + 1) * per_rank)) for s in range(STEPS)])
    for step in range(STEPS):
        total = pipeline.progress(batches).clone()
        dist.all_reduce(total)
        expected = ref.train_step(batch(step), world_size)
        loss_tol, _ = tolerances(device)
        torch.testing.assert_close(total.item(), expected, **loss_tol, msg=f"pipelined step {step} loss")
