"""Throughput of gr-dynemb's hash table operations, in billion key-value pairs per second (B-KV/s).

Per (dim, load factor): a table of ``--capacity`` slots (no growth) is filled to the load factor, then each op runs
on ``--keys`` keys per call: ``find`` (keys present), ``insert_or_assign`` (fresh keys; LRU eviction once buckets
are full) and ``find_or_insert`` (half present, half fresh). A Python-dict table (dict key -> row of a tensor) is
timed on the same keys at dim 64 as the baseline. Writes ``docs/benchmarks/dynemb.{json,md,png}``.

    python tools/bench_dynemb.py                  # CPU: dims 8/32/64/128, load factors 0.5/1.0, 2^20 keys per call
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
    ap.add_argument("--keys", type=int, default=1 << 20)
    ap.add_argument("--capacity", type=int, default=1 << 21)
    ap.add_argument("--dims", type=int, nargs="+", default=[8, 32, 64, 128])
    ap.add_argument("--load-factors", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--threads", type=int, default=0, help="table threads (0: all cores)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "dynemb"))
    args = ap.parse_args()
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
            f_it, m_it = iter(fresh), iter(mixed)
            ops = {
                "find": lambda t=table, k=present: t.find(k),
                "insert_or_assign": lambda t=table, it=f_it, v=values: t.insert_or_assign(next(it), v),
                "find_or_insert": lambda t=table, it=m_it: t.find_or_insert(next(it)),
            }
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

    meta = {
        "command": "python tools/bench_dynemb.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")
    md = markdown(meta, records)
    out.with_suffix(".md").write_text(md)
    plot(records, out.with_suffix(".png"))
    print(md)
    return 0


def markdown(meta: dict, records: list[dict]) -> str:
    lines = [
        "# gr-dynemb table operations (B-KV/s = billion key-value pairs per second)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; torch {meta['torch']}; Python {meta['python']}; {meta['date']}.",
        "",
        "| mode | dim | load factor | threads | find | insert_or_assign | find_or_insert |",
        "|---|---|---|---|---|---|---|",
    ]
    rows: dict[tuple, dict[str, float]] = {}
    for r in records:
        rows.setdefault((r["mode"], r["dim"], r["load_factor"], r["threads"]), {})[r["op"]] = r["bkv_per_s"]
    for (mode, dim, lf, threads), ops in rows.items():
        cells = [f"{ops[o]:.4f}" if o in ops else "-" for o in ("find", "insert_or_assign", "find_or_insert")]
        lines.append(f"| {mode} | {dim} | {lf} | {threads} | " + " | ".join(cells) + " |")
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

    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, op in zip(axes, ("find", "insert_or_assign", "find_or_insert"), strict=True):
        for lf in sorted({r["load_factor"] for r in records if r["mode"] == "cpu"}):
            pts = sorted(
                (r["dim"], r["bkv_per_s"])
                for r in records
                if r["mode"] == "cpu" and r["op"] == op and r["load_factor"] == lf
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"load factor {lf}")
        ax.set_xscale("log", base=2)
        ax.set_title(op)
        ax.set_xlabel("dim")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("B-KV/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
