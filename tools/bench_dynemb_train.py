"""A training lookup step (forward + backward + fused optimizer) of gr-dynemb against TorchRec's tables.

Each step looks up ``--keys`` power-law keys (P(rank) ~ rank^-alpha over ``--id-space`` ids per table) spread over
``--tables`` tables of dim ``--dim``, backpropagates a weighted sum of the embeddings and applies the optimizer to
the touched rows. Backends, timed in the same run on the same batches:

- ``gr_dynemb``: ``DynamicEmbeddingCollection`` on raw int64 keys (hashes of the ranks), fused optimizer in-row;
- ``torchrec_static``: TorchRec ``EmbeddingCollection`` with ``--id-space`` rows per table under
  ``DistributedModelParallel`` (one process, FUSED compute kernel = FBGEMM TBE with its fused optimizer), fed the
  compact rank ids: the collision-free static table a user gets when ids are already dense — the speed bound;
- ``torchrec_mch``: TorchRec ``ManagedCollisionEmbeddingCollection`` (ZCH ``MCHManagedCollisionModule``, LRU
  eviction, ``--id-space`` slots) on the same raw int64 keys, sharded the same way.

The optimizer is Adam where FBGEMM's TBE has it (CUDA) and exact Adagrad on CPU (FBGEMM's CPU TBE has no Adam);
every backend uses the same one. Records (``{"bench": "train_step", "device", "backend", "ms", ...}``) go to
``docs/benchmarks/dynemb_train.{json,md,png}``.

    python tools/bench_dynemb_train.py                                   # CPU: 2^18 keys, 2^18 ids per table
    python tools/bench_dynemb_train.py --device cuda --keys 1048576 --id-space 1048576   # the issue's GPU case
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling tools modules
from bench_outputs import merge_device_run, saved_runs, write_outputs

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("gr_dynemb", "torchrec_static", "torchrec_mch")


def power_law_ranks(n: int, id_space: int, alpha: float, gen: torch.Generator) -> torch.Tensor:
    """``n`` ranks in ``[0, id_space)`` with P(r) proportional to (r + 1)^-alpha (inverse-CDF sampling)."""
    weights = torch.arange(1, id_space + 1, dtype=torch.float64).pow(-alpha)
    cdf = torch.cumsum(weights, 0)
    cdf /= cdf[-1].clone()
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    return torch.searchsorted(cdf, u).clamp_(max=id_space - 1)


def distinct_random_keys(n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` distinct non-negative int64 keys, uniformly spread: the raw ids (hashes) a production stream carries."""
    while True:
        keys = torch.randint(0, 2**62, (n,), generator=gen, dtype=torch.int64)
        if torch.unique(keys).numel() == n:
            return keys


class Workload:
    """Pre-generated batches: per table, the compact rank ids and the raw int64 keys of the same draws."""

    def __init__(self, args: argparse.Namespace) -> None:
        gen = torch.Generator().manual_seed(args.seed)
        self.tables = args.tables
        self.feature_names = [f"f{t}" for t in range(args.tables)]
        per_table = args.keys // args.tables
        if per_table <= 0:
            raise ValueError(f"--keys ({args.keys}) must be at least --tables ({args.tables})")
        key_of_rank = [distinct_random_keys(args.id_space, gen) for _ in range(args.tables)]
        self.rank_batches: list[torch.Tensor] = []
        self.key_batches: list[torch.Tensor] = []
        for _ in range(args.batches):
            ranks = [power_law_ranks(per_table, args.id_space, args.alpha, gen) for _ in range(args.tables)]
            self.rank_batches.append(torch.cat(ranks))
            self.key_batches.append(torch.cat([key_of_rank[t][r] for t, r in enumerate(ranks)]))
        self.lengths = torch.ones(per_table * args.tables, dtype=torch.int64)
        self.distinct_per_batch = int(
            sum(torch.unique(r).numel() for r in self.rank_batches[0].split(per_table)) / args.tables
        )

    def kjt(self, values: torch.Tensor, device: torch.device):
        from torchrec import KeyedJaggedTensor

        return KeyedJaggedTensor(keys=self.feature_names, values=values.to(device), lengths=self.lengths.to(device))


def _loss(out: dict, feature_names: list[str], weight: torch.Tensor) -> torch.Tensor:
    return sum((out[f].values() * weight).sum() for f in feature_names)


def _plan_sharded(module, sharder, args, device: torch.device):
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingType

    constraints = {
        f"t{t}": ParameterConstraints(
            sharding_types=[ShardingType.ROW_WISE.value], compute_kernels=[EmbeddingComputeKernel.FUSED.value]
        )
        for t in range(args.tables)
    }
    topology = Topology(world_size=1, compute_device=device.type)
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).collective_plan(
        module, [sharder], dist.group.WORLD
    )
    return DistributedModelParallel(module, device=device, plan=plan, sharders=[sharder])


def _fused_params(args) -> dict:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    kind = EmbOptimType.ADAM if args.optimizer == "adam" else EmbOptimType.EXACT_ADAGRAD
    return {"optimizer": kind, "learning_rate": args.lr, "eps": 1e-8}


def _embedding_configs(args):
    from torchrec import EmbeddingConfig

    return [
        EmbeddingConfig(name=f"t{t}", embedding_dim=args.dim, num_embeddings=args.id_space, feature_names=[f"f{t}"])
        for t in range(args.tables)
    ]


def build_static(args, device: torch.device) -> Callable:
    from torchrec import EmbeddingCollection
    from torchrec.distributed.embedding import EmbeddingCollectionSharder

    ec = EmbeddingCollection(tables=_embedding_configs(args), device=torch.device("meta"))
    model = _plan_sharded(ec, EmbeddingCollectionSharder(fused_params=_fused_params(args)), args, device)
    return lambda kjt: model(kjt)


def build_mch(args, device: torch.device) -> Callable:
    from torchrec import EmbeddingCollection
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.mc_embedding import ManagedCollisionEmbeddingCollectionSharder
    from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingCollection
    from torchrec.modules.mc_modules import LRU_EvictionPolicy, ManagedCollisionCollection, MCHManagedCollisionModule

    configs = _embedding_configs(args)
    ec = EmbeddingCollection(tables=configs, device=torch.device("meta"))
    managers = {
        f"t{t}": MCHManagedCollisionModule(
            zch_size=args.id_space, device=device, eviction_policy=LRU_EvictionPolicy(), eviction_interval=1
        )
        for t in range(args.tables)
    }
    mc = ManagedCollisionEmbeddingCollection(ec, ManagedCollisionCollection(managers, configs))
    fused = _fused_params(args)
    sharder = ManagedCollisionEmbeddingCollectionSharder(
        ec_sharder=EmbeddingCollectionSharder(fused_params=fused), fused_params=fused
    )
    model = _plan_sharded(mc, sharder, args, device)

    def step(kjt):
        out = model(kjt)
        return out[0] if isinstance(out, tuple) else out  # (embeddings, remapped ids) when asked for both

    return step


def build_dynemb(args, device: torch.device) -> Callable:
    from gr_dynemb import (
        DynamicEmbeddingCollection,
        DynamicEmbeddingConfig,
        DynamicTable,
        DynamicTableConfig,
        FusedOptimizerConfig,
    )

    tables = [
        DynamicTable(
            name=f"t{t}",
            feature_names=[f"f{t}"],
            config=DynamicEmbeddingConfig(
                # The table lives where the step runs (its own device: Module.to does not move it).
                table=DynamicTableConfig(
                    dim=args.dim, capacity=args.id_space, max_capacity=4 * args.id_space, device=str(device)
                ),
                optimizer=FusedOptimizerConfig(kind=args.optimizer, lr=args.lr),
            ),
        )
        for t in range(args.tables)
    ]
    model = DynamicEmbeddingCollection(tables).to(device)
    return lambda kjt: model(kjt)


BUILDERS = {"gr_dynemb": build_dynemb, "torchrec_static": build_static, "torchrec_mch": build_mch}


def time_backend(name: str, args, work: Workload, device: torch.device) -> float:
    step_fn = BUILDERS[name](args, device)
    batches = work.rank_batches if name == "torchrec_static" else work.key_batches
    kjts = [work.kjt(b, device) for b in batches]
    weight = torch.randn(args.dim, generator=torch.Generator().manual_seed(1)).to(device)

    def step(i: int) -> None:
        _loss(step_fn(kjts[i % len(kjts)]), work.feature_names, weight).backward()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(args.warmup):
        step(i)
    sync()
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(args.warmup + i)
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]  # median step


def init_single_process_group(device: torch.device) -> None:
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def markdown(runs: list[dict], records: list[dict]) -> str:
    """One section per device (each run has its own workload), newest run first."""
    lines = ["# gr-dynemb training lookup step (forward + backward + fused optimizer)", ""]
    for meta in runs:
        mine = [r for r in records if r["device"] == meta["device"]]
        if not mine:
            continue
        r0 = mine[0]
        lines += [
            f"## {meta['device']}",
            "",
            f"Command: `{meta['command']}`  ",
            f"Machine: {meta['machine']}; torch {meta['torch']}; torchrec {meta['torchrec']}; Python "
            f"{meta['python']}; {meta['date']}.  ",
            f"Workload: {r0['keys']} keys per step over {r0['tables']} tables of dim {r0['dim']}, power law alpha "
            f"{r0['alpha']} over {r0['id_space']} ids per table ({r0['distinct_per_table']} distinct per table per "
            f"step), optimizer {r0['optimizer']}; median of {meta['steps']} steps after {meta['warmup']} warm-up "
            "steps.",
            "",
            "| device | backend | ms / step | vs torchrec_static |",
            "|---|---|---|---|",
        ]
        static = {r["device"]: r["ms"] for r in mine if r["backend"] == "torchrec_static"}
        for r in mine:
            rel = f"{r['ms'] / static[r['device']]:.2f}x" if r["device"] in static else "-"
            lines.append(f"| {r['device']} | {r['backend']} | {r['ms']:.1f} | {rel} |")
        lines.append("")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = list(dict.fromkeys(r["device"] for r in records))
    fig, axes = plt.subplots(1, len(devices), figsize=(5 * len(devices), 3.5), squeeze=False)
    for ax, dev in zip(axes[0], devices, strict=True):
        mine = [r for r in records if r["device"] == dev]
        ax.bar([r["backend"] for r in mine], [r["ms"] for r in mine], color=["C0", "C1", "C2"][: len(mine)])
        ax.set_ylabel("ms per training step (lower is better)")
        ax.set_title(f"{dev}: {mine[0]['keys']} keys, {mine[0]['tables']} x dim {mine[0]['dim']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--keys", type=int, default=None, help="keys per step, all tables (default: 2^20 cuda, 2^18 cpu)")
    ap.add_argument("--id-space", type=int, default=None, help="ids per table = static/MCH rows (default as --keys)")
    ap.add_argument("--tables", type=int, default=10)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--alpha", type=float, default=1.05)
    ap.add_argument("--optimizer", default=None, choices=["adam", "adagrad"], help="default: adam cuda, adagrad cpu")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batches", type=int, default=4, help="distinct pre-generated batches, cycled")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "dynemb_train"))
    ap.add_argument("--replot", action="store_true", help="only rewrite the .md/.png from the .json")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available")
    on_gpu = args.device == "cuda"
    args.keys = args.keys or (1 << 20 if on_gpu else 1 << 18)
    args.id_space = args.id_space or args.keys
    args.optimizer = args.optimizer or ("adam" if on_gpu else "adagrad")
    if args.optimizer == "adam" and not on_gpu:
        ap.error("FBGEMM's CPU TBE has no Adam: use --optimizer adagrad on CPU")
    if args.replot:
        return args
    for name in ("keys", "id_space", "tables", "dim", "batches", "steps"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.replot:
        write_outputs(out, *saved_runs(out), markdown, plot)
        return 0
    device = torch.device(args.device)
    init_single_process_group(device)
    work = Workload(args)
    records = []
    for name in args.backends:
        ms = time_backend(name, args, work, device)
        gc.collect()
        record = {
            "bench": "train_step",
            "device": "NVIDIA H200" if "H200" in device_name(device) else device_name(device),
            "backend": name,
            "ms": round(ms, 3),
            "keys": work.tables * (args.keys // args.tables),
            "tables": args.tables,
            "dim": args.dim,
            "alpha": args.alpha,
            "id_space": args.id_space,
            "distinct_per_table": work.distinct_per_batch,
            "optimizer": args.optimizer,
        }
        records.append(record)
        print(f"{record['device']:>12} {name:>16} {ms:9.1f} ms/step", flush=True)

    import torchrec

    meta = {
        "command": "python tools/bench_dynemb_train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores"
        + (f", {device_name(device)}" if args.device == "cuda" else ""),
        "torch": torch.__version__,
        "torchrec": getattr(torchrec, "__version__", "?"),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "steps": args.steps,
        "warmup": args.warmup,
        "device": records[0]["device"],
    }
    write_outputs(out, *merge_device_run(out, meta, records), markdown, plot)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
