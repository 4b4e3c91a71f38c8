"""Benchmark of the HSTU block's residual path: the output projection + residual add (``residual_linear``) and the
input LayerNorm that takes the residual's gradient (``layer_norm_residual``), fused against eager, at the training
step's shape (``n`` tokens, width ``d``, fp32 residual stream, bf16 autocast).

Cases, each forward + backward (what a training step runs per block):

- ``output + residual``: ``x + F.linear(y, W, b)`` (autocast: bf16 matmul, mixed-dtype add, and in the backward the
  gradient's cast and the bias sum as separate passes) against ``residual_linear`` (one matmul, one Triton pass each
  way);
- ``input norm + residual``: ``(LayerNorm(x), x)`` with both outputs used, as the block does (autograd adds the two
  gradients of ``x``), against ``layer_norm_residual`` (the residual's gradient added inside the norm's backward
  kernel); the eager side is the fused ``layer_norm_mul`` norm, as in the block with ``fused_norms``;
- ``layer_norm_mul backward``: the op's backward kernel alone (with and without ``u``), whose programs now walk
  several row blocks and write one partial row of dweight / dbias each.

Writes ``docs/benchmarks/residual_norm.{json,md,png}`` (``--out`` prefix) and prints the table.

    python tools/bench_residual_norm.py              # n 65536, d 512
    python tools/bench_residual_norm.py --replot     # md/png again from the JSON
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling tools modules
from bench_outputs import cuda_time_ms, run_gpu_bench

REPO = Path(__file__).resolve().parents[1]


def time_us(fn: Callable[[], object], reps: int) -> dict:
    """``us``: microseconds per call between CUDA events around back-to-back calls (the host's pace when it is
    slower than the GPU, as for small ops launched from Python); ``gpu_us``: the GPU time of its kernels per call
    (torch.profiler), what the call costs inside a GPU-bound training step."""
    from torch.profiler import ProfilerActivity, profile

    wall = cuda_time_ms(fn, reps, warmup=3) * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    gpu = sum(e.self_device_time_total for e in prof.key_averages()) / reps
    return {"us": round(wall, 1), "gpu_us": round(gpu, 1)}


def bench(n: int, d: int, reps: int) -> list[dict]:
    from gr_models.modules import norm_mul
    from gr_models.modules.residual_linear import eager_residual_linear, residual_linear

    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(n, d, device=dev, requires_grad=True)  # the fp32 residual stream
    y = torch.randn(n, d, device=dev, dtype=dt, requires_grad=True)  # the gated attention output (bf16)
    w = torch.nn.Parameter(torch.randn(d, d, device=dev) / d**0.5)
    b = torch.nn.Parameter(torch.zeros(d, device=dev))
    up = torch.randn(n, d, device=dev)
    base = {"n": n, "d": d}
    records = []

    def step(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast("cuda", dtype=dt):
                out = fn()
            out.backward(up)

        return run

    for method, fn in (("eager", eager_residual_linear), ("fused (residual_linear)", residual_linear)):
        records.append({**base, "case": "output + residual (fwd + bwd)", "method": method,
                        **time_us(step(lambda fn=fn: fn(x, y, w, b)), reps)})  # fmt: skip

    nw = torch.nn.Parameter(1 + 0.1 * torch.randn(d, device=dev))
    nb = torch.nn.Parameter(torch.zeros(d, device=dev))
    up_n = torch.randn(n, d, device=dev, dtype=dt)

    def norm_step(fused: bool) -> Callable[[], None]:
        def run() -> None:
            if fused:
                normed, res = norm_mul.layer_norm_residual(x, nw, nb, 1e-6, dt)
            else:
                normed, res = norm_mul.layer_norm_mul(x, None, nw, nb, 1e-6, dt), x
            torch.autograd.backward([normed, res], [up_n, up])

        return run

    for method, fused in (("eager add of the two gradients", False), ("fused (layer_norm_residual)", True)):
        records.append({**base, "case": "input norm + residual (fwd + bwd)", "method": method,
                        **time_us(norm_step(fused), reps)})  # fmt: skip

    u = torch.randn(n, d, device=dev, dtype=dt)
    attn = torch.randn(n, d, device=dev, dtype=dt)
    for label, xs, us in (("x fp32, no u (input norm)", x.detach(), None), ("x, u bf16 (gating)", attn, u)):
        y_, mean, rstd = norm_mul._forward_body(xs, us, nw.detach(), nb.detach(), 1e-6, dt)
        dy = torch.randn_like(y_)
        fn = lambda xs=xs, us=us, dy=dy, mean=mean, rstd=rstd: norm_mul._backward_body(  # noqa: E731
            dy, xs, us, nw.detach(), nb.detach(), mean, rstd
        )
        records.append({**base, "case": f"layer_norm_mul backward, {label}", "method": "fused",
                        **time_us(fn, reps)})  # fmt: skip
    with torch.autocast("cuda", dtype=dt):  # the fused output equals the eager one within the bf16 matmul's rounding
        got, want = residual_linear(x, y, w, b).detach(), eager_residual_linear(x, y, w, b).detach()
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.01)
    return records


def markdown(runs: list[dict], records: list[dict]) -> str:
    lines = ["# HSTU block residual path: output projection + residual, input norm + residual", ""]
    for run in runs:
        lines.append(
            f"- **{run['device']}**: `{run['command']}`; torch {run['torch']}, triton {run['triton']}, "
            f"python {run['python']}."
        )
    lines += [
        "",
        "Each case is forward + backward under bf16 autocast with an fp32 residual stream `x [n, d]` (the training "
        "step's, per HSTU block; the leaves' gradients accumulate, as parameters' do). `layer_norm_mul backward` rows "
        "time the op's backward alone. GPU us: the call's kernels (torch.profiler), what it costs in a GPU-bound "
        "step; wall us: CUDA events around back-to-back calls, which here follow the host's pace (Python, autograd "
        "and Triton launches) wherever that is slower than the kernels.",
        "",
        "| device | case | method | n | d | GPU us | wall us |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        gpu = f"{r['gpu_us']:.1f}" if "gpu_us" in r else "-"
        lines.append(f"| {r['device']} | {r['case']} | {r['method']} | {r['n']} | {r['d']} | {gpu} | {r['us']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.6))
    labels = [f"{r['case'][:34]}\n{r['method'][:30]}" for r in records]
    ax.barh(labels, [r.get("gpu_us", r["us"]) for r in records],
            color=["tab:gray" if "eager" in r["method"] else "tab:blue" for r in records])  # fmt: skip
    ax.set_xlabel("GPU us per call (kernels)")
    ax.tick_params(axis="y", labelsize=7)
    ax.invert_yaxis()
    fig.suptitle("HSTU block residual path (bench_residual_norm.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=65536, help="rows (tokens of the batch)")
    ap.add_argument("--d", type=int, default=512, help="model width")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--replot", action="store_true", help="rewrite the md/png from the saved JSON only")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "residual_norm")
    args = ap.parse_args()
    return run_gpu_bench(args.out, args.replot, lambda: bench(args.n, args.d, args.reps), markdown, plot)


if __name__ == "__main__":
    raise SystemExit(main())
