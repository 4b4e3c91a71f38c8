"""Caching storage against the hybrid tier under power-law traffic: lookups (B-KV/s) and training steps.

Every table knows all ``--id-space`` ids (prefilled). Each batch draws ``--keys`` ids with P(rank) ~ (rank+1)^-alpha
(ranks spread over int64 by a fixed odd multiplier) and looks up its unique ids, as a training step does:

- ``lookup``: ``find_or_insert`` (op of a training lookup) and ``find`` (touching scores; a caching table reads its
  misses from the host table without loading them) of a batch's unique ids (embedding rows only, no optimizer
  state; separate batches per op), B-KV/s over those ids, timed per batch from the Python call to the end of its
  device work, after warm-up batches (at least ``--warmup``, and for a caching table as many as it takes to fill its
  cache to 90%: steady-state evictions);
- ``train_step``: ``DynamicEmbedding`` forward + backward with fused Adam on a batch (de-duplication included), ms.

Modes on a GPU, with the same bytes of value rows in HBM (``--cache-rows`` rows):
- ``caching``: a CUDA cache of ``--cache-rows`` slots in front of a CPU host table of every id
  (``DynamicTableConfig(cache_capacity=...)``);
- ``hybrid``: one CUDA table of every id (load factor <= 0.5) whose first ``--cache-rows`` slots' value rows are in HBM
  and the rest in pinned host memory (``hbm_budget_bytes``): keys and scores of every slot stay in HBM.
On the CPU (``--device cpu``) ``caching`` (a CPU cache in front of the host table) runs against ``host`` (the host
table alone), which shows what the cache's bookkeeping costs where both tiers are host memory.

Records merge into ``docs/benchmarks/dynemb_caching.{json,md,png}`` per device (tools/bench_outputs.py).

    python tools/bench_dynemb_caching.py --device cuda     # H200: dims 64/128, alpha 1.05/1.2
    python tools/bench_dynemb_caching.py                   # CPU, smaller sizes
    python tools/bench_dynemb_caching.py --replot
    python tools/bench_dynemb_caching.py --merge /path/to/gpu/dynemb_caching.json   # add another machine's run
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
SPREAD = 0x1E3779B97F4A7C15  # odd: rank * SPREAD mod 2^62 is a bijection, so distinct ranks are distinct keys
ROW_BYTES_PER_SLOT = 8 + 8 + 1  # key, score, digest of a CUDA slot (HBM)


def rank_to_key(ranks: torch.Tensor) -> torch.Tensor:
    return ranks * SPREAD % (1 << 62)


class PowerLaw:
    """Ranks in ``[0, id_space)`` with P(r) ~ (r + 1)^-alpha by inverse-CDF sampling (CDF kept on ``device``)."""

    def __init__(self, id_space: int, alpha: float, device: torch.device, seed: int) -> None:
        weights = torch.arange(1, id_space + 1, dtype=torch.float64, device=device).pow_(-alpha)
        self.cdf = torch.cumsum(weights, 0)
        self.cdf /= self.cdf[-1].clone()
        self.id_space = id_space
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def keys(self, n: int) -> torch.Tensor:
        u = torch.rand(n, generator=self.gen, dtype=torch.float64, device=self.cdf.device)
        return rank_to_key(torch.searchsorted(self.cdf, u).clamp_(max=self.id_space - 1))


def table_config(args, mode: str, dim: int, value_dim: int, device: str):
    from gr_dynemb import DynamicTableConfig

    capacity = 1 << max(7, (2 * args.id_space - 1).bit_length())  # every id at load factor <= 0.5
    cfg = DynamicTableConfig(
        dim=dim, capacity=capacity, max_capacity=capacity, policy="lru", device=device, num_threads=args.threads
    )
    if mode == "caching":
        cfg.cache_capacity = args.cache_rows
    elif mode == "hybrid":
        cfg.hbm_budget_bytes = args.cache_rows * value_dim * 4
    cfg.__post_init__()
    return cfg


def prefill(table, id_space: int, value_dim: int, dim: int) -> None:
    """Every id present, with small embeddings and zero optimizer state (rows go straight into the table that holds
    them all: the host table of a caching table)."""
    target = table.host if hasattr(table, "host") else table
    for lo in range(0, id_space, 1 << 21):
        ranks = torch.arange(lo, min(id_space, lo + (1 << 21)), device=target.device)
        rows = torch.zeros(ranks.numel(), value_dim, device=target.device)
        rows[:, :dim] = torch.randn(ranks.numel(), dim, device=target.device) * 0.02
        target.insert_or_assign(rank_to_key(ranks), rows)


def hbm_bytes(mode: str, table, value_dim: int) -> int | None:
    if mode == "caching" and table.is_cuda:
        return table.cache.capacity() * (value_dim * 4 + ROW_BYTES_PER_SLOT)
    if mode == "hybrid":
        return table.hbm_rows() * value_dim * 4 + table.capacity() * ROW_BYTES_PER_SLOT
    return None


def warm_up(args, table, run_batch) -> int:
    """Runs ``--warmup`` batches, and more (up to ``--max-warmup``) until a caching table's cache is 90% full, so the
    timed batches pay for the evictions and write-backs of a steady state. Returns the batches run."""
    cache = getattr(table, "cache", None)
    done = 0
    while done < args.warmup or (
        cache is not None and done < args.max_warmup and cache.size() < 0.9 * cache.capacity()
    ):
        run_batch()
        done += 1
    return done


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_lookups(args, mode: str, dim: int, device: torch.device, base: dict) -> list[dict]:
    from gr_dynemb import make_table

    table = make_table(table_config(args, mode, dim, dim, str(device)))
    prefill(table, args.id_space, dim, dim)
    records = []
    for alpha in args.alphas:
        gen = PowerLaw(args.id_space, alpha, device, seed=1)

        def lookup(gen: PowerLaw = gen) -> None:
            table.set_step(table.step + 1)
            table.find_or_insert(torch.unique(gen.keys(args.keys)))

        warmed = warm_up(args, table, lookup)
        for op, seed in (("find_or_insert", 101), ("find", 103)):
            timed = PowerLaw(args.id_space, alpha, device, seed=seed)  # every mode times the same batches
            batches = [torch.unique(timed.keys(args.keys)) for _ in range(args.batches)]
            hits0, misses0, wb0 = (getattr(table, k, 0) for k in ("hits", "misses", "write_backs"))
            seconds, n = 0.0, 0
            try:
                for batch in batches:
                    table.set_step(table.step + 1)
                    sync(device)
                    t0 = time.perf_counter()
                    if op == "find":
                        table.find(batch, touch=True)
                    else:
                        table.find_or_insert(batch)
                    sync(device)
                    seconds += time.perf_counter() - t0
                    n += batch.numel()
            except Exception as exc:  # one failing op must not cost the other records
                print(json.dumps({"failed": f"lookup {op} {mode} dim {dim} alpha {alpha}", "error": repr(exc)}))
                continue
            rec = dict(
                base, bench="lookup", op=op, mode=mode, dim=dim, alpha=alpha, unique_per_batch=n // args.batches,
                bkv_per_s=round(n / seconds / 1e9, 5), ms_per_batch=round(1e3 * seconds / args.batches, 3),
                hbm_bytes=hbm_bytes(mode, table, dim), warmup_batches=warmed,
            )  # fmt: skip
            if mode == "caching" and op == "find_or_insert":  # find reads past the cache without counting
                looked = table.hits + table.misses - hits0 - misses0
                rec["hit_rate"] = round((table.hits - hits0) / looked, 4)
                rec["write_backs_per_batch"] = (table.write_backs - wb0) // args.batches
            records.append(rec)
            print(json.dumps(rec), flush=True)
    return records


def bench_train(args, mode: str, dim: int, device: torch.device, base: dict) -> list[dict]:
    from gr_dynemb import DynamicEmbedding, DynamicEmbeddingConfig, FusedOptimizerConfig

    opt = FusedOptimizerConfig(kind="adam", lr=1e-3)
    value_dim = dim + opt.state_dim(dim)
    module = DynamicEmbedding(DynamicEmbeddingConfig(table_config(args, mode, dim, value_dim, str(device)), opt))
    prefill(module.table, args.id_space, value_dim, dim)
    records = []
    for alpha in args.alphas:
        gen = PowerLaw(args.id_space, alpha, device, seed=2)
        warmed = warm_up(args, module.table, lambda gen=gen: module(gen.keys(args.keys)).sum().backward())
        timed = PowerLaw(args.id_space, alpha, device, seed=102)  # every mode times the same batches
        batches = [timed.keys(args.keys) for _ in range(args.batches)]
        times = []
        for ids in batches:
            sync(device)
            t0 = time.perf_counter()
            module(ids).sum().backward()
            sync(device)
            times.append(time.perf_counter() - t0)
        times.sort()
        rec = dict(
            base, bench="train_step", mode=mode, dim=dim, alpha=alpha, optimizer="adam",
            ms=round(1e3 * times[len(times) // 2], 3), ms_min=round(1e3 * times[0], 3),
            hbm_bytes=hbm_bytes(mode, module.table, value_dim), warmup_batches=warmed,
        )  # fmt: skip
        records.append(rec)
        print(json.dumps(rec), flush=True)
        del batches
    return records


def markdown(runs: list[dict], records: list[dict]) -> str:
    lines = ["# gr-dynemb caching storage vs the hybrid tier under power-law traffic", ""]
    for meta in runs:
        lines.append(
            f"- **{meta['device']}**: `{meta['command']}`; {meta['machine']}; torch {meta['torch']}; Python "
            f"{meta['python']}; {meta['date']}; {meta['id_space']} ids, cache / HBM value rows {meta['cache_rows']}, "
            f"{meta['keys']} keys per batch, {meta['batches']} timed batches after >= {meta['warmup']} warm-up batches "
            "(caching: until its cache is 90% full)."
        )
    lines += [
        "",
        "Lookups: `find_or_insert` / `find` of each batch's unique ids (B-KV/s over unique ids). Training: "
        "DynamicEmbedding forward + backward + fused Adam per batch (median ms). HBM: bytes of value rows and slots "
        "in HBM.",
        "",
        "| device | bench | op | dim | alpha | mode | unique ids/batch | B-KV/s | ms | hit rate | write-backs/batch "
        "| HBM MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["device"], r["bench"], r.get("op", ""), r["dim"], r["alpha"], r["mode"])):
        ms = r.get("ms", r.get("ms_per_batch"))
        hbm = f"{r['hbm_bytes'] / 2**20:.0f}" if r.get("hbm_bytes") else "-"
        lines.append(
            f"| {r['device']} | {r['bench']} | {r.get('op', '-')} | {r['dim']} | {r['alpha']} | {r['mode']} | "
            f"{r.get('unique_per_batch', '-')} | {r.get('bkv_per_s', '-')} | {ms} | {r.get('hit_rate', '-')} | "
            f"{r.get('write_backs_per_batch', '-')} | {hbm} |"
        )
    lines.append("")
    if any(r["device"] == "cpu" for r in records):
        lines.append(
            "On the CPU both tiers are host memory, so the cache can only add work (a second table, evictions, "
            "write-backs); the CPU rows show that overhead. The question a cache answers is the GPU one: caching vs "
            "hybrid with the same HBM."
        )
    if not any(r["device"] != "cpu" for r in records):
        lines.append("\nNo GPU records yet: `python tools/bench_dynemb_caching.py --device cuda` on a GPU adds them.")
    lines.append("")
    for r in records:
        if r["mode"] != "caching":
            continue
        other = [
            o
            for o in records
            if o["mode"] != "caching"
            and (o["device"], o["bench"], o.get("op"), o["dim"], o["alpha"])
            == (r["device"], r["bench"], r.get("op"), r["dim"], r["alpha"])
        ]
        for o in other:
            if r["bench"] == "lookup":
                ratio = r["bkv_per_s"] / o["bkv_per_s"]
                what = f"{r['op']} throughput"
            else:
                ratio = o["ms"] / r["ms"]
                what = "training step speed"
            lines.append(
                f"- {r['device']}, dim {r['dim']}, alpha {r['alpha']}: caching {what} = {ratio:.2f}x {o['mode']}."
            )
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = sorted({r["device"] for r in records})
    fig, axes = plt.subplots(len(devices), 2, figsize=(12, 4.2 * len(devices)), squeeze=False)
    for row, device in zip(axes, devices, strict=True):
        for ax, bench, key, label in (
            (row[0], "lookup", "bkv_per_s", "find_or_insert (B-KV/s, higher is better)"),
            (row[1], "train_step", "ms", "training step, Adam (ms, lower is better)"),
        ):
            shown = [r for r in records if r["device"] == device and r["bench"] == bench]
            bars = sorted(
                (r for r in shown if r.get("op", "find_or_insert") == "find_or_insert"),
                key=lambda r: (r["dim"], r["alpha"], r["mode"]),
            )
            ax.bar(
                range(len(bars)),
                [r[key] for r in bars],
                color=["tab:green" if r["mode"] == "caching" else "tab:gray" for r in bars],
            )
            ax.set_xticks(range(len(bars)), [f"d{r['dim']} a{r['alpha']}\n{r['mode']}" for r in bars], fontsize=7)
            ax.set_title(f"{device}: {label}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--alphas", type=float, nargs="+", default=[1.05, 1.2])
    ap.add_argument("--id-space", type=int, default=None, help="ids (default 2^22 CUDA, 2^20 CPU)")
    ap.add_argument("--cache-rows", type=int, default=None, help="cache slots = HBM value rows (default id-space/8)")
    ap.add_argument("--keys", type=int, default=None, help="ids per batch (default 2^19 CUDA, 2^16 CPU)")
    ap.add_argument("--warmup", type=int, default=8, help="warm-up batches (at least)")
    ap.add_argument("--max-warmup", type=int, default=150, help="warm-up batches to fill a cache (at most)")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--benches", nargs="+", choices=["lookup", "train_step"], default=["lookup", "train_step"])
    ap.add_argument("--threads", type=int, default=0, help="host table threads (0: all cores)")
    ap.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--replot", action="store_true", help="only rewrite the .md/.png from the .json")
    ap.add_argument("--merge", type=Path, help="merge another run's .json (e.g. a GPU machine's) into --out")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "dynemb_caching"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        write_outputs(out, *saved_runs(out), markdown, plot)
        return 0
    if args.merge:
        runs, records = saved_runs(args.merge.with_suffix(""))
        for meta in runs:
            mine = [r for r in records if r["device"] == meta["device"]]
            write_outputs(out, *merge_device_run(out, meta, mine), markdown, plot)
        return 0
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda needs a CUDA GPU")
    args.id_space = args.id_space or (1 << 22 if cuda else 1 << 20)
    args.cache_rows = args.cache_rows or args.id_space // 8
    args.keys = args.keys or (1 << 19 if cuda else 1 << 16)
    device = torch.device("cuda" if cuda else "cpu")
    meta = {
        "command": "python tools/bench_dynemb_caching.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, host "
        f"table threads {args.threads or os.cpu_count()}, load average at start {os.getloadavg()[0]:.1f}",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        **{k: getattr(args, k) for k in ("id_space", "cache_rows", "keys", "warmup", "max_warmup", "batches")},
    }
    base = {"device": meta["device"], "id_space": args.id_space, "cache_rows": args.cache_rows, "keys": args.keys}
    modes = ["caching", "hybrid"] if cuda else ["caching", "host"]
    records = []
    benches = {"lookup": bench_lookups, "train_step": bench_train}
    for dim in args.dims:
        for bench in args.benches:
            for mode in modes:
                try:
                    records += benches[bench](args, mode, dim, device, base)
                except Exception as exc:  # a failing mode must not cost the other records
                    print(json.dumps({"failed": f"{bench} {mode} dim {dim}", "error": repr(exc)}), flush=True)
                if cuda:
                    torch.cuda.empty_cache()
            write_outputs(out, *merge_device_run(out, meta, records), markdown, plot)  # what finished so far
    return 0


if __name__ == "__main__":
    sys.exit(main())
