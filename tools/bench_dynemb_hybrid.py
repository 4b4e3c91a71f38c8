"""Hybrid-tier lookups against the size of the host tier: where the PCIe-read rate of the CUDA table's host rows goes.

Half of every table's rows live in pinned host memory (``hbm_budget_bytes`` = half the values); ``find`` of 2^20
present keys, random over the table. Table capacity sets the host tier's size. Prints a table and writes
``docs/benchmarks/dynemb_hybrid.{json,md}``.

    python tools/bench_dynemb_hybrid.py            # needs a CUDA GPU and gr-dynemb's CUDA build
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def measure(cap_log: int, dim: int, n: int, gen: torch.Generator) -> dict:
    from gr_dynemb import DynamicHashTable, DynamicTableConfig

    def keys(m: int) -> torch.Tensor:
        return torch.randint(-(2**62), 2**62, (m,), generator=gen, dtype=torch.int64, device="cuda")

    cap = 1 << cap_log
    cfg = DynamicTableConfig(
        dim=dim, capacity=cap, max_capacity=cap, max_load_factor=1.0, device="cuda", hbm_budget_bytes=cap // 2 * dim * 4
    )
    t = DynamicHashTable(cfg)
    resident = keys(cap // 2)
    for part in resident.split(1 << 22):
        t.insert_or_assign(part, torch.randn(part.numel(), dim, device="cuda", generator=gen))
    present = resident[torch.randint(resident.numel(), (n,), device="cuda", generator=gen)]
    t.find(present)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        t.find(present)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    host_mib = (cap - t.hbm_rows()) * dim * 4 / 2**20
    return {
        "device": torch.cuda.get_device_name(),
        "capacity_log2": cap_log,
        "dim": dim,
        "host_tier_mib": round(host_mib),
        "find_bkv_per_s": round(n / best / 1e9, 4),
        "host_read_gb_per_s": round(n * 0.5 * dim * 4 / best / 1e9, 1),
    }


def markdown(meta: dict, records: list[dict]) -> str:
    lines = [
        "# gr-dynemb hybrid tier: lookups vs host-tier size",
        "",
        f"Command: `{meta['command']}`  ",
        f"Device: {meta['device']}; torch {meta['torch']}; Python {meta['python']}; {meta['date']}.  ",
        "Half of the values in pinned host memory, load factor 0.5, find of 2^20 present keys (best of 3).",
        "",
        "| capacity | dim | host tier (MiB) | find (B-KV/s) | host reads (GB/s) |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| 2^{r['capacity_log2']} | {r['dim']} | {r['host_tier_mib']} | {r['find_bkv_per_s']:.3f} | "
            f"{r['host_read_gb_per_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--capacities-log2", type=int, nargs="+", default=[21, 23, 25])
    ap.add_argument("--dims", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--keys", type=int, default=1 << 20)
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "dynemb_hybrid"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    records = []
    for cap_log in args.capacities_log2:
        for dim in args.dims:
            records.append(measure(cap_log, dim, args.keys, gen))
            print(json.dumps(records[-1]), flush=True)
            torch.cuda.empty_cache()
    meta = {
        "command": "python tools/bench_dynemb_hybrid.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(meta, records))
    print(markdown(meta, records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
