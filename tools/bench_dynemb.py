"""Throughput of gr-dynemb's hash table operations, in billion key-value pairs per second (B-KV/s).

Per (dim, load factor): a table of ``--capacity`` slots (no growth) is filled to the load factor, then each op runs
on ``--keys`` keys per call: ``find`` (keys present), ``insert_or_assign`` (fresh keys; LRU eviction once buckets
are full) and ``find_or_insert`` (half present, half fresh). On the CPU a Python-dict table (dict key -> row of a
tensor) is timed on the same keys at dim 64 as the baseline. With ``--device cuda`` the CUDA table runs in mode
``hbm`` (all value rows in HBM) and ``hybrid`` (half of the value rows in pinned host memory, read through UVA);
a call is timed from the Python API to the end of its kernels (torch.cuda.synchronize), best of ``--repeats``.

Records go to ``docs/benchmarks/dynemb.{json,md,png}``, merged with the records already there from other devices
(a CUDA run keeps the CPU records and the other way round).

    python tools/bench_dynemb.py                  # CPU: dims 8/32/64/128, load factors 0.5/1.0, 2^20 keys per call
    python tools/bench_dynemb.py --device cuda    # GPU: the same grid, modes hbm and hybrid, 2^25-slot tables
    python tools/bench_dynemb.py --replot         # rewrite the .md/.png from the .json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling tools modules
from bench_outputs import merge_device_run, saved_runs, write_outputs

REPO = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def random_keys(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-(2**62), 2**62, (n,), generator=gen, dtype=torch.int64)


class DictTable:
    """The baseline: a Python dict from key to a row index of a preallocated tensor."""

    def __init__(self, capacity: int, dim: int) -> None:
        self.index: dict[int, int] = {}
        self.rows = torch.zeros(capacity, dim)

    def insert_or_assign(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        idx = []
        for k in keys.tolist():
            i = self.index.get(k)
            if i is None:
                i = self.index[k] = len(self.index)
            idx.append(i)
        self.rows[torch.tensor(idx)] = values

    def find(self, keys: torch.Tensor) -> torch.Tensor:
        idx = torch.tensor([self.index.get(k, -1) for k in keys.tolist()])
        return self.rows[idx.clamp(min=0)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--modes", nargs="+", choices=["hbm", "hybrid"], default=["hbm", "hybrid"], help="CUDA modes")
    ap.add_argument("--keys", type=int, default=1 << 20)
    ap.add_argument("--capacity", type=int, default=None, help="slots per table (default 2^21 CPU, 2^25 CUDA)")
    ap.add_argument("--replot", action="store_true", help="only rewrite the .md/.png from the .json")
    ap.add_argument("--dims", type=int, nargs="+", default=[8, 32, 64, 128])
    ap.add_argument("--load-factors", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--threads", type=int, default=0, help="table threads (0: all cores)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "dynemb"))
    args = ap.parse_args()
    out = Path(args.out)
    if args.replot:
        write_outputs(out, *saved_runs(out), markdown, plot)
        return 0
    if args.capacity is None:
        args.capacity = 1 << 25 if args.device == "cuda" else 1 << 21
    meta = {
        "command": "python tools/bench_dynemb.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.device == "cuda":
        meta["device"] = torch.cuda.get_device_name()
        records = bench_cuda(args)
    else:
        meta["device"] = "cpu"
        records = bench_cpu(args)
    write_outputs(out, *merge_device_run(out, meta, records), markdown, plot)
    return 0


def bench_cuda(args: argparse.Namespace) -> list[dict]:
    from gr_dynemb import DynamicHashTable, DynamicTableConfig

    device = torch.cuda.get_device_name()
    gen = torch.Generator(device="cuda").manual_seed(0)

    def keys_on_gpu(n: int) -> torch.Tensor:
        return torch.randint(-(2**62), 2**62, (n,), generator=gen, dtype=torch.int64, device="cuda")

    def timed_cuda(fn, repeats: int) -> float:
        best = float("inf")
        for _ in range(repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best

    records = []
    for mode in args.modes:
        for dim in args.dims:
            for lf in args.load_factors:
                budget = args.capacity // 2 * dim * 4 if mode == "hybrid" else None
                cfg = DynamicTableConfig(
                    dim=dim, capacity=args.capacity, max_capacity=args.capacity, max_load_factor=1.0, device="cuda",
                    hbm_budget_bytes=budget,
                )  # fmt: skip
                table = DynamicHashTable(cfg)
                table.set_step(1)
                resident = keys_on_gpu(int(lf * table.capacity()))
                for part in resident.split(1 << 22):
                    table.insert_or_assign(part, torch.randn(part.numel(), dim, device="cuda", generator=gen))
                table.set_step(2)
                present = resident[torch.randint(resident.numel(), (args.keys,), device="cuda", generator=gen)]
                values = torch.randn(args.keys, dim, device="cuda", generator=gen)
                fresh = [keys_on_gpu(args.keys) for _ in range(args.repeats)]
                half = torch.rand(args.keys, device="cuda", generator=gen) < 0.5
                mixed = [torch.where(half, present, f) for f in fresh]
                table.find(present)  # warm-up: module load, allocator
                ops = table_ops(table, present, fresh, mixed, values)
                for op, fn in ops.items():
                    seconds = timed_cuda(fn, args.repeats)
                    rec = dict(
                        bench="op", device=device, op=op, dim=dim, load_factor=lf, mode=mode, keys=args.keys,
                        capacity=table.capacity(), hbm_rows=table.hbm_rows(),
                        bkv_per_s=round(args.keys / seconds / 1e9, 5),
                    )  # fmt: skip
                    records.append(rec)
                    print(json.dumps(rec), flush=True)
                del table, resident, present, values, fresh, mixed
                torch.cuda.empty_cache()
    return records


def table_ops(table, present, fresh: list, mixed: list, values) -> dict:
    """The three timed operations: find of present keys, insert_or_assign of a fresh batch per call, find_or_insert
    of a half-present batch per call (each call takes the next batch, so no call repeats a finished insert)."""
    f_it, m_it = iter(fresh), iter(mixed)
    return {
        "find": lambda: table.find(present),
        "insert_or_assign": lambda: table.insert_or_assign(next(f_it), values),
        "find_or_insert": lambda: table.find_or_insert(next(m_it)),
    }


def bench_cpu(args: argparse.Namespace) -> list[dict]:
    from gr_dynemb import DynamicHashTable, DynamicTableConfig

    gen = torch.Generator().manual_seed(0)
    threads = args.threads or os.cpu_count() or 1
    records = []
    for dim in args.dims:
        for lf in args.load_factors:
            cfg = DynamicTableConfig(
                dim=dim, capacity=args.capacity, max_capacity=args.capacity, max_load_factor=1.0, num_threads=threads
            )
            table = DynamicHashTable(cfg)
            resident = random_keys(int(lf * table.capacity()), gen)
            table.insert_or_assign(resident, torch.randn(resident.numel(), dim, generator=gen))
            present = resident[torch.randint(resident.numel(), (args.keys,), generator=gen)]
            fresh = [random_keys(args.keys, gen) for _ in range(args.repeats)]
            values = torch.randn(args.keys, dim, generator=gen)
            mixed = [torch.where(torch.rand(args.keys, generator=gen) < 0.5, present, f) for f in fresh]
            ops = table_ops(table, present, fresh, mixed, values)
            for op, fn in ops.items():
                seconds = timed(fn, args.repeats)
                rec = dict(
                    bench="op", device="cpu", op=op, dim=dim, load_factor=lf, mode="cpu", threads=threads,
                    keys=args.keys, capacity=table.capacity(), bkv_per_s=round(args.keys / seconds / 1e9, 5),
                )  # fmt: skip
                records.append(rec)
                print(json.dumps(rec), flush=True)
    # Python-dict baseline at dim 64, load factor 0.5.
    base = DictTable(args.capacity + args.keys * (args.repeats + 1), 64)
    resident = random_keys(args.capacity // 2, gen)
    base.insert_or_assign(resident, torch.randn(resident.numel(), 64, generator=gen))
    present = resident[torch.randint(resident.numel(), (args.keys,), generator=gen)]
    values = torch.randn(args.keys, 64, generator=gen)
    it_fresh = iter([random_keys(args.keys, gen) for _ in range(args.repeats)])
    for op, fn in (
        ("find", lambda: base.find(present)),
        ("insert_or_assign", lambda: base.insert_or_assign(next(it_fresh), values)),
    ):
        seconds = timed(fn, args.repeats)
        rec = dict(
            bench="op", device="cpu", op=op, dim=64, load_factor=0.5, mode="python_dict", threads=1,
            keys=args.keys, capacity=None, bkv_per_s=round(args.keys / seconds / 1e9, 5),
        )  # fmt: skip
        records.append(rec)
        print(json.dumps(rec), flush=True)
    return records


# Targets of the gr-dynemb issue on one H200 at dim 64, load factor 0.5 (B-KV/s).
GPU_TARGETS = {("hbm", "find"): 4.0, ("hbm", "insert_or_assign"): 1.5, ("hbm", "find_or_insert"): 1.5}
GPU_TARGETS[("hybrid", "find")] = 0.15


def markdown(runs: list[dict], records: list[dict]) -> str:
    lines = ["# gr-dynemb table operations (B-KV/s = billion key-value pairs per second)", ""]
    for meta in runs:
        lines += [
            f"- **{meta.get('device', 'cpu')}**: `{meta['command']}`; {meta['machine']}; torch {meta['torch']}; "
            f"Python {meta['python']}; {meta['date']}."
        ]
    lines += [
        "",
        "| device | mode | dim | load factor | capacity | find | insert_or_assign | find_or_insert |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows: dict[tuple, dict[str, float]] = {}
    for r in records:
        key = (r["device"], r["mode"], r["dim"], r["load_factor"], r.get("capacity"))
        rows.setdefault(key, {})[r["op"]] = r["bkv_per_s"]
    for (device, mode, dim, lf, cap), ops in rows.items():
        cells = [f"{ops[o]:.4f}" if o in ops else "-" for o in ("find", "insert_or_assign", "find_or_insert")]
        cap_cell = f"2^{int(cap).bit_length() - 1}" if cap else "-"
        lines.append(f"| {device} | {mode} | {dim} | {lf} | {cap_cell} | " + " | ".join(cells) + " |")
    if not any(r["device"] != "cpu" for r in records):
        lines.append(
            "\nNo GPU records yet: `python tools/bench_dynemb.py --device cuda` on a GPU machine adds modes `hbm` and "
            "`hybrid` (targets on one H200 at dim 64, load factor 0.5: find >= 4.0, insert_or_assign >= 1.5, "
            "find_or_insert >= 1.5 B-KV/s; hybrid find >= 0.15)."
        )
    gpu = [r for r in records if r["device"] != "cpu" and r["dim"] == 64 and r["load_factor"] == 0.5]
    for (mode, op), target in GPU_TARGETS.items():
        got = [r["bkv_per_s"] for r in gpu if r["mode"] == mode and r["op"] == op]
        if got:
            verdict = "met" if got[0] >= target else "NOT met"
            lines.append(
                f"\n{mode} {op} at dim 64, load factor 0.5: {got[0]:.3f} B-KV/s (target >= {target}: {verdict})."
            )
    native = {
        r["op"]: r["bkv_per_s"] for r in records if r["mode"] == "cpu" and r["dim"] == 64 and r["load_factor"] == 0.5
    }
    base = {r["op"]: r["bkv_per_s"] for r in records if r["mode"] == "python_dict"}
    for op in ("find", "insert_or_assign"):
        if op in native and op in base:
            lines.append(f"\n{op} at dim 64, load factor 0.5: {native[op] / base[op]:.1f}x the Python-dict table.")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    series = sorted({(r["mode"], r["load_factor"]) for r in records if r["mode"] != "python_dict"})
    for ax, op in zip(axes, ("find", "insert_or_assign", "find_or_insert"), strict=True):
        for mode, lf in series:
            pts = sorted(
                (r["dim"], r["bkv_per_s"])
                for r in records
                if r["mode"] == mode and r["op"] == op and r["load_factor"] == lf
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{mode}, load factor {lf}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(op)
        ax.set_xlabel("dim")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("B-KV/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
