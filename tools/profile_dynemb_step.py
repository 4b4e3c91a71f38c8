"""Where a gr-dynemb training lookup step spends its time: the grouped path against the per-table path.

Drives ``DynamicEmbedding`` tables directly (no TorchRec needed, so it runs where TorchRec is not installed) on the
workload of ``tools/bench_dynemb_train.py``: ``--keys`` power-law ids over ``--tables`` tables of dim ``--dim``,
forward + backward of the bench's loss + fused optimizer. Modes:

- ``grouped``: ``gr_dynemb.grouped.grouped_train_lookup`` over all tables (what ``DynamicEmbeddingCollection`` runs);
- ``per_table``: each table's own lookup (``DynamicEmbedding._lookup_one``: ``torch.unique``, ``find_or_insert``,
  the reserved-key check, ``index_add_`` + ``apply_optimizer`` per table), the collection's path before grouping.

For each mode it prints the median step time and a torch.profiler breakdown of one step: device time per kernel,
kernel launches, and host synchronisations (stream/device synchronise calls, device-to-host copies). A JSON summary
goes to ``--json`` when given.

    python tools/profile_dynemb_step.py --device cuda --keys 1048576 --id-space 1048576
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dynemb_train import Workload  # the bench's batches (power-law ranks -> raw int64 keys)

from gr_dynemb import DynamicEmbedding, DynamicEmbeddingConfig, DynamicTableConfig, FusedOptimizerConfig
from gr_dynemb.grouped import grouped_train_lookup

MODES = ["per_table", "grouped"]
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def build(args, device: torch.device) -> list[DynamicEmbedding]:
    return [
        DynamicEmbedding(
            DynamicEmbeddingConfig(
                DynamicTableConfig(
                    dim=args.dim, capacity=args.id_space, max_capacity=4 * args.id_space, device=str(device)
                ),
                FusedOptimizerConfig(kind=args.optimizer, lr=1e-3),
            )
        ).to(device)
        for _ in range(args.tables)
    ]


def make_step(mode: str, modules: list[DynamicEmbedding], weight: torch.Tensor):
    def step(ids: list[torch.Tensor]) -> None:
        if mode == "grouped":
            outs = grouped_train_lookup(modules, ids)
        else:
            outs = [m._lookup_one(x) for m, x in zip(modules, ids, strict=True)]
        sum((o * weight).sum() for o in outs).backward()

    return step


def profile_one(step, ids, device: torch.device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step(ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
    kernels: Counter[str] = Counter()
    kernel_us: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    d2h = 0
    for e in prof.events():
        name = e.name
        if e.device_type == torch.autograd.DeviceType.CUDA:
            if "DtoH" in name or "Device -> Host" in name:
                d2h += 1
            kernels[name] += 1
            kernel_us[name] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        elif name.startswith("cuda"):
            calls[name] += 1
    # The final torch.cuda.synchronize() is the timing harness's, not the step's.
    calls["cudaDeviceSynchronize"] -= 1 if device.type == "cuda" else 0
    top = [{"kernel": k[:110], "count": kernels[k], "us": round(kernel_us[k], 1)} for k, _ in kernel_us.most_common(18)]
    host = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)[:10]
    return {
        "host_us_total": round(sum(a.self_cpu_time_total for a in prof.key_averages()), 1),
        "top_host_ops": [
            {"op": a.key[:80], "count": a.count, "self_us": round(a.self_cpu_time_total, 1)} for a in host
        ],
        "device_us_total": round(sum(kernel_us.values()), 1),
        "device_ops": sum(kernels.values()),
        "kernel_launches": calls.get("cudaLaunchKernel", 0) + calls.get("cudaLaunchKernelExC", 0),
        "syncs": {k: calls.get(k, 0) for k in SYNC_CALLS},
        "memcpy_async_calls": calls.get("cudaMemcpyAsync", 0),
        "d2h_copies": d2h,
        "top_kernels": top,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--keys", type=int, default=1 << 20)
    ap.add_argument("--id-space", type=int, default=1 << 20)
    ap.add_argument("--tables", type=int, default=10)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--alpha", type=float, default=1.05)
    ap.add_argument("--optimizer", default="adam", choices=["adam", "adagrad", "sgd", "rowwise_adagrad"])
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument("--json", default=None, help="write the summary here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    work = Workload(args)
    per_table = args.keys // args.tables
    batches = [[b.to(device) for b in kb.split(per_table)] for kb in work.key_batches]
    weight = torch.randn(args.dim, generator=torch.Generator().manual_seed(1)).to(device)
    summary: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "args": vars(args),
    }
    for mode in args.modes:
        modules = build(args, device)
        step = make_step(mode, modules, weight)
        for i in range(args.warmup):
            step(batches[i % len(batches)])
        if device.type == "cuda":
            torch.cuda.synchronize()
        times = []
        for i in range(args.steps):
            t0 = time.perf_counter()
            step(batches[(args.warmup + i) % len(batches)])
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - t0))
        prof = profile_one(step, batches[(args.warmup + args.steps) % len(batches)], device)
        summary[mode] = {"median_ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3), **prof}
        print(f"== {mode}: median {summary[mode]['median_ms']:.2f} ms/step (min {summary[mode]['min_ms']:.2f})")
        print(
            f"   device time {prof['device_us_total'] / 1e3:.2f} ms in {prof['device_ops']} device ops; "
            f"{prof['kernel_launches']} kernel launches; syncs {prof['syncs']}; "
            f"cudaMemcpyAsync {prof['memcpy_async_calls']}, D2H copies {prof['d2h_copies']}"
        )
        for k in prof["top_kernels"]:
            print(f"   {k['us']:9.1f} us  x{k['count']:<4d} {k['kernel']}")
        print(f"   host (self CPU time) {prof['host_us_total'] / 1e3:.2f} ms; top ops:")
        for k in prof["top_host_ops"]:
            print(f"   {k['self_us']:9.1f} us  x{k['count']:<4d} {k['op']}")
        del modules, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
