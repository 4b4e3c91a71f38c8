"""Benchmark of the HSTU projection's fused backward (``gr_models.modules.silu_projection``) against the eager one.

The pointwise part of the U/V/Q/K projection's backward at the training step's shape (``n`` rows, four pieces of
``width`` columns, bf16): eagerly autograd concatenates the pieces' gradients, runs the SiLU backward and sums the
bias gradient (three passes over ``[n, 4 * width]``); ``silu_split_backward`` is one Triton pass that reads the
pieces in place and writes per-program bias partials. Also timed: the whole projection forward + backward
(``linear_silu_split`` against ``eager_linear_silu_split``, matmuls included) under bf16 autocast, and with
``--sweep`` every tile of the kernel (``ONE_PIECE`` x rows per program x rows per step x columns x warps), which is
how the default tile was chosen.

Writes ``docs/benchmarks/silu_projection.{json,md,png}`` (``--out`` prefix) and prints the table.

    python tools/bench_silu_projection.py            # n 65536, 4 x 512, bf16
    python tools/bench_silu_projection.py --sweep    # plus the tile sweep
    python tools/bench_silu_projection.py --replot   # md/png again from the JSON (e.g. where matplotlib is)
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling tools modules
from bench_outputs import cuda_time_ms, run_gpu_bench

REPO = Path(__file__).resolve().parents[1]
SWEEP_ROWS = (64, 128, 256)
SWEEP_BLOCK_M = (8, 16, 32)
SWEEP_BLOCK_N = (128, 256)
SWEEP_WARPS = (4, 8)


def time_us(fn: Callable[[], object], reps: int) -> float:
    """Microseconds per call (CUDA events around ``reps`` back-to-back calls after 3 untimed ones)."""
    return cuda_time_ms(fn, reps, warmup=3) * 1e3


def bench(n: int, width: int, reps: int, sweep: bool) -> list[dict]:
    from gr_models.modules import silu_projection as sp
    from gr_models.modules import silu_projection_kernels as kernels

    torch.manual_seed(0)
    dt, dev = torch.bfloat16, "cuda"
    total = 4 * width
    y = torch.randn(n, total, device=dev, dtype=dt)
    grads = [torch.randn(n, width, device=dev, dtype=dt) for _ in range(4)]

    def eager() -> tuple[torch.Tensor, torch.Tensor]:  # what autograd runs: the bias gradient summed in bf16
        dy = torch.ops.aten.silu_backward(torch.cat(grads, 1), y)
        return dy, dy.sum(0)

    ref_dy, ref_db = eager()
    ref_db = ref_db.float()
    dy, db = sp.silu_split_backward(grads, y)
    err_dy = (dy.float() - ref_dy.float()).abs().max().item()
    err_db = ((db - ref_db).abs().max() / ref_db.abs().max()).item()
    base = {"n": n, "width": width, "pieces": 4, "dtype": "bf16"}
    default = sp._tiles([width] * 4, y.device)
    records = [
        {**base, "case": "pointwise backward", "method": "eager (cat + silu_backward + bias sum)",
         "us": round(time_us(eager, reps), 1)},
        {**base, "case": "pointwise backward", "method": "fused (silu_split_backward, default tile)",
         "us": round(time_us(lambda: sp.silu_split_backward(grads, y), reps), 1), "tile": default,
         "max_abs_dy_vs_eager": err_dy, "max_rel_dbias_vs_eager": err_db},
    ]  # fmt: skip

    x = torch.randn(n, 512, device=dev, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(total, 512, device=dev) * 0.02)
    bias = torch.nn.Parameter(torch.zeros(total, device=dev))
    ups = [torch.randn(n, width, device=dev, dtype=dt) for _ in range(4)]

    def step(fn: Callable[..., tuple[torch.Tensor, ...]]) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast("cuda", dtype=dt):
                outs = fn(x, weight, bias, [width] * 4)
            torch.autograd.backward(outs, ups)

        return run

    for name, fn in (("eager", sp.eager_linear_silu_split), ("fused", sp.linear_silu_split)):
        records.append(
            {**base, "case": "projection forward + backward (x [n, 512], autocast bf16)", "method": name,
             "us": round(time_us(step(fn), reps), 1)}
        )  # fmt: skip

    if sweep:
        for one, rows, bm, bn, warps in itertools.product(
            (True, False), SWEEP_ROWS, SWEEP_BLOCK_M, SWEEP_BLOCK_N, SWEEP_WARPS
        ):
            if bm > rows or (one and width % bn):
                continue
            programs = (-(-n // rows), -(-total // bn))
            out = torch.empty_like(y)
            part = torch.empty(programs[0], total, device=dev)
            tile = {"ROWS_PER_PROGRAM": rows, "BLOCK_M": bm, "BLOCK_N": bn, "ONE_PIECE": one, "num_warps": warps}

            def run(tile=tile, programs=programs, out=out, part=part) -> torch.Tensor:
                kernels.silu_split_bwd_kernel[programs](
                    *grads, y, out, part, n, *(g.stride(0) for g in grads), y.stride(0), out.stride(0),
                    W=total, C1=width, C2=2 * width, C3=3 * width, **tile,
                )  # fmt: skip
                return part.sum(0)

            records.append({**base, "case": "tile sweep", "method": "fused", "tile": tile,
                            "us": round(time_us(run, reps), 1)})  # fmt: skip
    return records


def tile_name(tile: dict | None) -> str:
    if not tile:
        return ""
    one = "one piece" if tile["ONE_PIECE"] else "masked"
    return (
        f"{tile['ROWS_PER_PROGRAM']} rows x {tile['BLOCK_N']} cols, {tile['BLOCK_M']}-row steps, "
        f"{tile['num_warps']} warps, {one}"
    )


def markdown(runs: list[dict], records: list[dict]) -> str:
    lines = ["# Fused backward of the HSTU U/V/Q/K projection (silu_split_backward)", ""]
    for run in runs:
        lines.append(
            f"- **{run['device']}**: `{run['command']}`; torch {run['torch']}, triton {run['triton']}, "
            f"python {run['python']}."
        )
    lines += [
        "",
        "Pointwise backward: eager = autograd's concatenation of the four pieces' gradients, SiLU backward and bias "
        "column sum; fused = one Triton pass reading the pieces in place. Projection forward + backward: the whole "
        "op with its two matmuls. Tile sweep: the fastest 10 tiles of the kernel (the default tile is the one "
        "`_tiles` picks).",
        "",
        "| device | case | method | tile | n | pieces x width | us |",
        "|---|---|---|---|---|---|---|",
    ]
    shown = [r for r in records if r["case"] != "tile sweep"]
    for device in sorted({r["device"] for r in records}):
        sweep = [r for r in records if r["case"] == "tile sweep" and r["device"] == device]
        shown += sorted(sweep, key=lambda r: r["us"])[:10]
    for r in shown:
        lines.append(
            f"| {r['device']} | {r['case']} | {r['method']} | {tile_name(r.get('tile'))} | {r['n']} | "
            f"{r['pieces']} x {r['width']} | {r['us']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    main = [r for r in records if r["case"] != "tile sweep"]
    axes[0].barh([f"{r['case'][:24]}\n{r['method'][:28]}" for r in main], [r["us"] for r in main], color="tab:blue")
    axes[0].set_xlabel("us per call")
    axes[0].tick_params(axis="y", labelsize=7)
    sweep = sorted((r for r in records if r["case"] == "tile sweep"), key=lambda r: r["us"])
    if sweep:
        axes[1].plot(range(len(sweep)), [r["us"] for r in sweep], marker=".", color="tab:orange")
        axes[1].set_xlabel("tile (sorted by time)")
        axes[1].set_ylabel("us per call")
        axes[1].set_title(f"{len(sweep)} tiles of the fused kernel", fontsize=9)
    else:
        axes[1].axis("off")
    fig.suptitle("HSTU projection backward (bench_silu_projection.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=65536, help="rows (tokens of the batch)")
    ap.add_argument("--width", type=int, default=512, help="columns of each of the four pieces")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--sweep", action="store_true", help="time every tile of the kernel")
    ap.add_argument("--replot", action="store_true", help="rewrite the md/png from the saved JSON only")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "silu_projection")
    args = ap.parse_args()
    return run_gpu_bench(
        args.out, args.replot, lambda: bench(args.n, args.width, args.reps, args.sweep), markdown, plot
    )


if __name__ == "__main__":
    raise SystemExit(main())
