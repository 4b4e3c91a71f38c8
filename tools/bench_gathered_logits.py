"""Benchmark of ``gathered_logits`` (in-batch negatives of the sampled softmax): forward and forward + backward time
of the chunked PyTorch backend, the Triton backend, and the dense route (``(q @ c^T).gather``, which
``in_batch_logits`` takes for small batches) where its ``[N, N]`` score matrix fits.

Shapes are those of the retrieval training step: N queries against M = N candidates (the batch's target
embeddings), K in-batch picks per query, dim D, bf16 operands (what autocast hands the op), both needing gradients.
The Triton backend's parts are timed alone too (forward kernel, grad_q kernel, the sort into a CSR by candidate,
grad_c kernel), and ``--sweep`` times a few tile configs of each kernel at the largest N.

Writes ``docs/benchmarks/gathered_logits.{json,md,png}`` (``--out`` prefix) and prints the table.

    python tools/bench_gathered_logits.py                      # N in {4k, 16k, 64k}, K 32, D 512, bf16
    python tools/bench_gathered_logits.py --ns 65536 --sweep   # plus tile configs of the Triton kernels
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling tools modules
from bench_outputs import cuda_time_ms as time_ms
from bench_outputs import merge_device_run, write_outputs

from gr_models.retrieval import gathered_logits as gl
from gr_models.retrieval import gathered_logits_triton as glt

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DENSE_MAX_BYTES = 48 << 30  # the dense route's [N, M] scores and their gradient, both alive in backward


def peak_gib(fn: Callable[[], object]) -> float:
    """Peak memory one call allocates beyond what was alive before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def methods(n: int) -> dict[str, Callable]:
    out = {
        "torch": lambda q, c, i: gl.gathered_logits(q, c, i, backend="torch"),
        "triton": lambda q, c, i: gl.gathered_logits(q, c, i, backend="triton"),
    }
    if 2 * n * n * 4 <= DENSE_MAX_BYTES:  # fp32 upstream gradient of the scores, plus the scores
        out["dense"] = lambda q, c, i: (q @ c.T).gather(1, i)
    return out


def bench_case(
    n: int, k: int, d: int, dtype: torch.dtype, reps: int, wanted: list[str], hot: float = 0.0
) -> list[dict]:
    """One shape; ``hot``: the fraction of picks sent to candidate 0 (a skewed draw: one long run for grad_c)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(n, d, device="cuda", generator=gen).to(dtype).requires_grad_()
    c = torch.randn(n, d, device="cuda", generator=gen).to(dtype).requires_grad_()
    index = torch.randint(n, (n, k), device="cuda", generator=gen)
    if hot:
        index[torch.rand(n, k, device="cuda", generator=gen) < hot] = 0
    up = torch.randn(n, k, device="cuda", generator=gen).to(dtype)
    results: dict[str, tuple] = {}
    records = []
    for name, fn in methods(n).items():
        if name not in wanted:
            continue

        def fwd(fn=fn):
            with torch.no_grad():
                return fn(q, c, index)

        def fwd_bwd(fn=fn):
            q.grad = c.grad = None
            fn(q, c, index).backward(up)

        fwd_bwd()
        results[name] = (fn(q, c, index).detach(), q.grad.clone(), c.grad.clone())
        rec = dict(device=torch.cuda.get_device_name(), method=name, n=n, m=n, k=k, d=d, dtype=DTYPE_NAMES[dtype],
                   hot=hot, fwd_ms=round(time_ms(fwd, reps), 3), fwd_bwd_ms=round(time_ms(fwd_bwd, reps), 3),
                   peak_gib=round(peak_gib(fwd_bwd), 3))  # fmt: skip
        if name == "triton":
            rec["parts_ms"] = triton_parts(q.detach(), c.detach(), index, up, reps)
        records.append(rec)
        print(f"N={n} K={k} D={d} hot={hot} {name}: fwd {rec['fwd_ms']:.3f} ms, fwd+bwd {rec['fwd_bwd_ms']:.3f} ms, "
              f"peak {rec['peak_gib']:.2f} GiB {rec.get('parts_ms', '')}", flush=True)  # fmt: skip
    if "torch" in results:
        for name, got in results.items():
            errs = [rel_err(x, y) for x, y in zip(got, results["torch"], strict=True)]
            for rec in records:
                if rec["method"] == name:
                    rec["rel_err_vs_torch"] = [float(f"{e:.3g}") for e in errs]
    q.grad = c.grad = None
    return records


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30)).item()


def triton_parts(q, c, index, up, reps: int, blocks: glt.Blocks | None = None, only: str | None = None):
    """Milliseconds of each piece of the Triton backend alone (or of ``only``): forward, grad_q, grad_c (with its
    plan), the plan alone (sort into a CSR by candidate, segments), and the index range check."""
    m = c.size(0)
    segment = (blocks or glt.DEFAULT_BLOCKS).grad_c_segment
    pieces = {
        "fwd": lambda: glt.forward(q, c, index, blocks),
        "grad_q": lambda: glt.grad_queries(up, c, index, blocks),
        "grad_c": lambda: glt.grad_candidates(up, q, index, m, blocks),
        "grad_c_plan": lambda: glt.segment_plan(index, m, segment),
        "range_check": lambda: glt.check_operands(q, c, index),
    }
    return {name: round(time_ms(fn, reps), 3) for name, fn in pieces.items() if only in (None, name)}


SWEEP = {
    "fwd": [dict(fwd_picks=p, fwd_d=dd, fwd_warps=w) for p, dd, w in
            [(32, 128, 4), (64, 128, 4), (128, 128, 8), (64, 256, 8), (32, 512, 8), (16, 512, 4)]],
    "grad_q": [dict(grad_q_rows=r, grad_q_d=dd, grad_q_warps=w) for r, dd, w in
               [(16, 128, 4), (32, 128, 4), (64, 128, 8), (16, 256, 4), (32, 256, 8), (16, 512, 8)]],
    "grad_c": [dict(grad_c_picks=p, grad_c_d=dd, grad_c_warps=w) for p, dd, w in
               [(16, 256, 4), (16, 512, 4), (16, 512, 8), (32, 512, 8)]],
}  # fmt: skip


def sweep(n: int, k: int, d: int, dtype: torch.dtype, reps: int, parts: list[str]) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(n, d, device="cuda", generator=gen).to(dtype)
    c = torch.randn(n, d, device="cuda", generator=gen).to(dtype)
    index = torch.randint(n, (n, k), device="cuda", generator=gen)
    up = torch.randn(n, k, device="cuda", generator=gen).to(dtype)
    out = []
    for part, options in SWEEP.items():
        if part not in parts:
            continue
        for opt in options:
            blocks = dataclasses.replace(glt.DEFAULT_BLOCKS, **opt)
            try:
                ms = triton_parts(q, c, index, up, reps, blocks, only=part)[part]
            except Exception as e:  # a config this GPU cannot run: reported, not fatal
                print(f"sweep {part} {opt}: {type(e).__name__}: {e}", flush=True)
                continue
            out.append(dict(part=part, n=n, k=k, d=d, ms=ms, **opt))
            print(f"sweep N={n} {part} {opt}: {ms:.3f} ms", flush=True)
    return out


def markdown(runs: list[dict], records: list[dict]) -> str:
    lines = ["# gathered_logits: in-batch negative logits, forward and forward + backward (ms)", ""]
    for run in runs:
        lines.append(f"- {run['device']}: torch {run['torch']}, triton {run.get('triton')}, Python {run['python']}; "
                     f"`{run['command']}`")  # fmt: skip
    lines += ["", "| device | N = M | K | D | dtype | hot | method | fwd ms | fwd+bwd ms | peak GiB | max rel. err vs "
              "torch (logits, grad_q, grad_c) |", "|---" * 11 + "|"]  # fmt: skip
    for r in records:
        if "method" not in r:
            continue
        errs = ", ".join(f"{e:.2g}" for e in r.get("rel_err_vs_torch", []))
        times = f"{r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r['peak_gib']:.2f}"
        lines.append(f"| {r['device']} | {r['n']} | {r['k']} | {r['d']} | {r['dtype']} | {r.get('hot', 0)} | "
                     f"{r['method']} | {times} | {errs} |")  # fmt: skip
    parts = [r for r in records if r.get("method") == "triton" and "parts_ms" in r]
    if parts:
        names = list(parts[0]["parts_ms"])
        header = "| device | N | hot | " + " | ".join(names) + " |"
        lines += ["", "Triton backend by part (ms, each timed alone):", "", header, "|---" * (3 + len(names)) + "|"]
        for r in parts:
            cells = " | ".join(f"{v:.3f}" for v in r["parts_ms"].values())
            lines.append(f"| {r['device']} | {r['n']} | {r.get('hot', 0)} | {cells} |")
    sweeps = [r for r in records if "part" in r]
    if sweeps:
        lines += ["", "Tile sweep (ms per kernel call):", "", "| device | N | part | config | ms |", "|---" * 5 + "|"]
        for r in sweeps:
            cfg = {key: v for key, v in r.items() if key not in ("device", "part", "n", "k", "d", "ms")}
            lines.append(f"| {r['device']} | {r['n']} | {r['part']} | {cfg} | {r['ms']:.3f} |")
    lines += ["", "fwd: no autograd graph; fwd+bwd: forward, then backward with both operands needing gradients. "
              "dense: `(q @ c.T).gather(1, index)` (only where the [N, N] scores fit). rel. err: max abs difference "
              "from the torch backend over its max abs value. hot: the fraction of picks moved to one candidate.",
              ""]  # fmt: skip
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    main = [r for r in records if "method" in r and not r.get("hot")]
    for dev, method in dict.fromkeys((r["device"], r["method"]) for r in main):
        rows = sorted((r for r in main if (r["device"], r["method"]) == (dev, method)), key=lambda r: r["n"])
        ax.plot([r["n"] for r in rows], [r["fwd_bwd_ms"] for r in rows], marker="o", label=f"{dev} {method}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("queries N (= candidates M)")
    ax.set_ylabel("forward + backward, ms")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--methods", nargs="+", default=["torch", "triton", "dense"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--hot", type=float, nargs="*", default=[], help="extra skewed cases at the largest N: the "
                    "fraction of picks on one candidate")  # fmt: skip
    ap.add_argument("--sweep", action="store_true", help="time tile configs of each Triton kernel at the largest N")
    ap.add_argument("--sweep-parts", nargs="+", choices=sorted(SWEEP), default=sorted(SWEEP))
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "gathered_logits")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    import triton

    dtype = DTYPES[args.dtype]
    records = []
    for n in args.ns:
        records += bench_case(n, args.k, args.d, dtype, args.reps, args.methods)
    for hot in args.hot:
        records += bench_case(max(args.ns), args.k, args.d, dtype, args.reps, ["torch", "triton"], hot)
    if args.sweep:
        records += sweep(max(args.ns), args.k, args.d, dtype, args.reps, args.sweep_parts)
    meta = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), command="python " + " ".join(sys.argv))  # fmt: skip
    for r in records:
        r.setdefault("device", meta["device"])
    runs, all_records = merge_device_run(args.out, meta, records)
    write_outputs(args.out, runs, all_records, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
