"""Time of one sequence-embedding table lookup (FBGEMM's TBE, no pooling), forward and forward + backward with the
fused row-wise Adagrad update, by table size, weight precision and id order.

Why: in ``tools/bench_parallel.py`` (10M x 512 item table, ~131k ids per step: the inputs and the targets of 32
sequences of up to 4096) the lookup's forward kernel took 6.9 ms of a 74 ms step on an H200, ~30x what its bytes
need. This bench separates the suspects: the table's footprint (address translation over 20 GB of random rows;
``--rows``), its precision (``--weights``: fp16 halves both the bytes and the footprint) and the ids' order
(``--orders``: ``sorted`` ids walk the table monotonically, the same rows).

Per case: a table of ``rows x dim`` on the device (FBGEMM's own initialisation), ``--ids`` uniform random row ids in
``--bags`` jagged sequences; best of ``--repeats`` timed calls after a warm-up, CUDA events. ``GB/s`` counts the
rows read and the fp32 output written by the forward. Records go to ``docs/benchmarks/embedding_lookup.{json,md,png}``
(``--out``), merged by device with what is there.

    python tools/bench_embedding_lookup.py --device cuda        # GPU: rows 100k/1M/10M, fp32/fp16, random/sorted
    python tools/bench_embedding_lookup.py --device cpu --rows 100000 --ids 8192 --repeats 2   # CPU smoke run
    python tools/bench_embedding_lookup.py --replot
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling tools modules

REPO = Path(__file__).resolve().parents[1]


def make_table(rows: int, dim: int, weights: str, device: torch.device):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    cuda = device.type == "cuda"
    return SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[
            (
                rows,
                dim,
                EmbeddingLocation.DEVICE if cuda else EmbeddingLocation.HOST,
                ComputeDevice.CUDA if cuda else ComputeDevice.CPU,
            )
        ],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.01,
        weights_precision=SparseType.FP16 if weights == "fp16" else SparseType.FP32,
        output_dtype=SparseType.FP32,
        pooling_mode=PoolingMode.NONE,
        device=device,
    )


def time_ms(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (kernel selection, first-touch of the output buffers)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            best = min(best, start.elapsed_time(stop))
        else:
            t = time.perf_counter()
            fn()
            best = min(best, (time.perf_counter() - t) * 1e3)
    return best


def run_case(args: argparse.Namespace, rows: int, weights: str, order: str, bags: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, rows, (args.ids,), generator=gen)
    if order == "sorted":
        ids = ids.sort().values
    if bags >= args.ids:  # one entry per id
        bags, offsets = args.ids, torch.arange(args.ids + 1)
    else:  # jagged sequences of random lengths
        cuts = torch.randint(0, args.ids + 1, (bags - 1,), generator=gen).sort().values
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([args.ids])])
    ids, offsets = ids.to(device), offsets.to(device)
    table = make_table(rows, args.dim, weights, device)
    grad = torch.randn(args.ids, args.dim, device=device)

    def forward():
        return table(ids, offsets)

    def forward_backward():
        table(ids, offsets).backward(grad)  # the fused optimizer updates the rows inside backward

    fwd = time_ms(forward, device, args.repeats)
    fwd_bwd = time_ms(forward_backward, device, args.repeats)
    row_bytes = args.dim * (2 if weights == "fp16" else 4)
    moved = args.ids * (row_bytes + args.dim * 4)
    return dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        rows=rows,
        dim=args.dim,
        weights=weights,
        ids=args.ids,
        entries=bags,
        order=order,
        table_gb=round(rows * row_bytes / 1e9, 2),
        fwd_ms=round(fwd, 4),
        fwd_bwd_ms=round(fwd_bwd, 4),
        fwd_gbps=round(moved / fwd / 1e6, 1),
    )


def markdown(runs: list[dict], records: list[dict]) -> str:
    lines = ["# Sequence-embedding table lookup (FBGEMM TBE, no pooling, fused row-wise Adagrad)", ""]
    for r in runs:
        versions = f"torch {r['torch']}, fbgemm-gpu {r['fbgemm_gpu']}"
        lines.append(f"- **{r['device']}**: `{r['command']}`; {versions}; {r['date']}")
    lines += [
        "",
        "GB/s: rows read plus fp32 output written by the forward, over its time.",
        "",
        "| device | rows | dim | weights | table GB | ids | entries | id order | fwd ms | fwd GB/s | fwd+bwd ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['device']} | {r['rows']:,} | {r['dim']} | {r['weights']} | {r['table_gb']} | {r['ids']:,} | "
            f"{r.get('entries', 64):,} | {r['order']} | {r['fwd_ms']:.3f} | {r['fwd_gbps']:.0f} | "
            f"{r['fwd_bwd_ms']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    series: dict[tuple, list[tuple[int, float]]] = {}
    for r in records:  # one line per device, precision, id order and entry layout
        entries = "1 id per entry" if r.get("entries", 64) >= r["ids"] else f"{r.get('entries', 64)} entries"
        series.setdefault((r["device"][:12], r["weights"], r["order"], entries), []).append((r["rows"], r["fwd_ms"]))
    for key, pts in series.items():
        ax.plot(*zip(*sorted(set(pts)), strict=True), marker="o", label=" ".join(key))
    ax.set_xscale("log")
    ax.set_xlabel("table rows")
    ax.set_ylabel("forward ms")
    ax.set_yscale("log")
    ax.set_title("TBE lookup forward by table size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--weights", nargs="+", default=["fp32", "fp16"], choices=["fp32", "fp16"])
    ap.add_argument("--orders", nargs="+", default=["random", "sorted"], choices=["random", "sorted"])
    ap.add_argument("--ids", type=int, default=131072, help="ids per lookup (bench_parallel: ~131k per rank)")
    ap.add_argument(
        "--bags",
        type=int,
        nargs="+",
        default=[64, 131072],
        help="entries (bags) the ids form: jagged sequences of random lengths, or one per id when >= --ids",
    )
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "embedding_lookup"))
    ap.add_argument("--replot", action="store_true", help="rewrite the .md/.png from the saved .json")
    args = ap.parse_args()
    from bench_outputs import merge_device_run, saved_runs, write_outputs

    out = Path(args.out)
    if args.replot:
        write_outputs(out, *saved_runs(out), markdown, plot)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda needs a CUDA GPU (or pass --device cpu)", file=sys.stderr)
        return 2
    if min(args.rows) < 1 or args.ids < 1 or min(args.bags) < 1:
        ap.error("--rows, --ids and --bags must be positive")
    import fbgemm_gpu

    device = torch.device(args.device)
    records = []
    for rows in args.rows:
        for weights in args.weights:
            for order in args.orders:
                for bags in args.bags:
                    rec = run_case(args, rows, weights, order, bags, device)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()  # the case's table is gone: give its memory back before the next
                    print(rec, flush=True)
                    records.append(rec)
    meta = dict(
        device=records[0]["device"],
        command="python tools/bench_embedding_lookup.py " + " ".join(sys.argv[1:]),
        torch=torch.__version__,
        fbgemm_gpu=getattr(fbgemm_gpu, "__version__", "?"),
        date=time.strftime("%Y-%m-%d"),
    )
    write_outputs(out, *merge_device_run(out, meta, records), markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
