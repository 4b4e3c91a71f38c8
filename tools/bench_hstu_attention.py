"""Benchmark of HSTU attention backends against torch SDPA on the same shapes, in one run.

For every case (head dim, max length, uniform or jagged lengths, mask, rab on/off) and direction (fwd, bwd) it times
our backends (``cutlass``, ``triton``, ``reference``) and torch's ``scaled_dot_product_attention`` (causal
softmax, FLASH and CUDNN backends; no rab or targets, so only for the plain causal cases), and reports TFLOP/s with
FLOPs = 2 * H * D * sum(L_i^2) forward (the causal half of 4 * H * D * L^2) and 2.5x that backward.

Writes ``docs/benchmarks/hstu_attention.{json,md,png}`` (``--out`` prefix) and prints the table. Every case is timed
from one clock state (``--timing``, bench_outputs.TIMINGS): ``burst`` (default) after an idle pause at the boost clock,
``sustained`` after a second of calls with the clock settled under the GPU's power cap.

    python tools/bench_hstu_attention.py                      # the full grid (several minutes: each case idles 0.5 s)
    python tools/bench_hstu_attention.py --quick              # head dims 128/256, lengths 1024/4096
    python tools/bench_hstu_attention.py --backends cutlass_sm90 cutlass_sm80 --dims 256 --max-lens 4096 \
        --directions fwd

Backends ``cutlass_sm90`` / ``cutlass_sm80`` are the native backend with its forward routed to the Hopper
(WGMMA/TMA) or the SM80-MMA kernel (GR_KERNELS_FWD_KERNEL=sm90|sm80); ``cutlass`` uses the build's default.
``triton`` is the portable Triton backend (autotuned over its short config list on first use, inside the warmup);
``triton_atomic_dq`` / ``triton_fused_dkdv`` run it with GR_KERNELS_TRITON_DQ=atomic / GR_KERNELS_TRITON_SPLIT_DKDV=0.
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_outputs import TIMINGS, clock_state_time_ms

REPO = Path(__file__).resolve().parents[1]
TOKENS_PER_BATCH = 32 * 4096  # batch = TOKENS_PER_BATCH // max_seq_len: B=32 at T=4096
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
REFERENCE_MAX_BYTES = 4 * 2**30  # the reference materialises [B, H, N, N] scores several times: skip larger
# Benchmark names that run a registered backend under kernel switches: name -> (backend, environment).
VARIANTS = {
    "cutlass_sm90": ("cutlass", {"GR_KERNELS_FWD_KERNEL": "sm90"}),
    "cutlass_sm80": ("cutlass", {"GR_KERNELS_FWD_KERNEL": "sm80"}),
    "triton_atomic_dq": ("triton", {"GR_KERNELS_TRITON_DQ": "atomic"}),
    "triton_fused_dkdv": ("triton", {"GR_KERNELS_TRITON_SPLIT_DKDV": "0"}),
}


def lengths_for(batch: int, max_len: int, jagged: bool) -> list[int]:
    if not jagged:
        return [max_len] * batch
    gen = torch.Generator().manual_seed(0)
    return torch.randint(1, max_len + 1, (batch,), generator=gen).tolist()


def hstu_case(
    backend: str,
    lengths: list[int],
    heads: int,
    dim: int,
    mask: str,
    rab: bool,
    direction: str,
    rab_heads: int = 1,
    rab_grad: bool = True,
    dtype: torch.dtype = torch.bfloat16,
):
    import gr_kernels

    dev = "cuda"
    # The bias side (max_seq_len, an upper bound of the lengths) rounded up to 8 elements, as gr-models' encoder and
    # scorer pass it: 16-byte bias rows go through TMA (a jagged batch's longest length is rarely a multiple of 8).
    n = -(-max(lengths) // 8) * 8
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, dim, device=dev, dtype=dtype) * 0.5 for _ in range(3))
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=dev)
    bias = torch.randn(len(lengths), rab_heads, n, n, device=dev, dtype=dtype) * 0.1 if rab else None
    targets = None
    if mask == "causal_targets":
        targets = torch.tensor([min(16, max(length - 1, 0)) for length in lengths], device=dev)
    name, switches = VARIANTS.get(backend, (backend, {}))
    # validate=False: the inputs here are valid by construction, and the op's input check copies the offsets to the
    # host on every call (a sync that idles the GPU between calls, which the SDPA baselines do not pay).
    kw = dict(alpha=1.0 / dim**0.5, num_targets=targets, rab=bias, backend=name, validate=False)
    if direction == "fwd":
        fn = lambda: gr_kernels.hstu_attention(q, k, v, offsets, n, **kw)  # noqa: E731
    else:
        # A trainable bias (rab_grad) is a leaf whose gradient the backward computes too; a frozen one costs no drab.
        leaves = [t.requires_grad_() for t in (q, k, v, *([bias] if rab and rab_grad else []))]
        out = gr_kernels.hstu_attention(*leaves[:3], offsets, n, **kw)
        grad = torch.randn_like(out)
        fn = lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True)  # noqa: E731
    if not switches:
        return fn

    def with_switches():  # the backends read their GR_KERNELS_* switches on every call
        os.environ.update(switches)
        try:
            return fn()
        finally:
            for key in switches:
                os.environ.pop(key, None)

    return with_switches


def sdpa_case(kind: str, lengths: list[int], heads: int, dim: int, direction: str, dtype: torch.dtype = torch.bfloat16):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}[kind]
    dev = "cuda"
    if len(set(lengths)) != 1:
        # Jagged: SDPA's varlen path is the nested-tensor one; time the padded batch instead would inflate FLOPs,
        # so jagged SDPA cases are run as nested tensors (FLASH supports them; cuDNN may not).
        qs = [torch.randn(heads, length, dim, device=dev, dtype=dtype) for length in lengths]
        q = torch.nested.nested_tensor(qs, layout=torch.jagged)
        k = torch.nested.nested_tensor([torch.randn_like(t) for t in qs], layout=torch.jagged)
        v = torch.nested.nested_tensor([torch.randn_like(t) for t in qs], layout=torch.jagged)
    else:
        q, k, v = (torch.randn(len(lengths), heads, lengths[0], dim, device=dev, dtype=dtype) for _ in range(3))

    def fwd(*args):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(*args, is_causal=True)

    if direction == "fwd":
        return lambda: fwd(q, k, v)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = fwd(*leaves)
    grad = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backends", nargs="+", default=["cutlass", "triton", "reference", "sdpa_flash", "sdpa_cudnn"])
    ap.add_argument("--directions", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument(
        "--timing",
        default="burst",
        choices=sorted(TIMINGS),
        help="clock state each case is timed in: " + "; ".join(f"{k}: {v}" for k, v in TIMINGS.items()),
    )
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="q/k/v (and bias) element type")
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--max-lens", type=int, nargs="+", default=None, help="default: 1024 4096 (--quick), 256..8192")
    ap.add_argument("--masks", nargs="+", default=["causal", "causal_targets"], choices=["causal", "causal_targets"])
    ap.add_argument("--layouts", nargs="+", default=["uniform", "jagged"], choices=["uniform", "jagged"])
    ap.add_argument(
        "--rab",
        nargs="+",
        default=["off", "on"],
        choices=["off", "on", "frozen"],
        help="cases without rab, with a trainable rab (the backward computes its gradient), with a frozen rab (no "
        "gradient: bwd skips drab)",
    )
    ap.add_argument(
        "--rab-heads",
        type=int,
        default=1,
        help="bias planes per sequence: 1 (default) = one plane shared by all heads, or --heads = one per head",
    )
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "hstu_attention"))
    args = ap.parse_args()
    if args.rab_heads not in (1, args.heads):
        ap.error(f"--rab-heads must be 1 or --heads ({args.heads}), got {args.rab_heads}")
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import gr_kernels

    dims, dtype = args.dims, DTYPES[args.dtype]
    max_lens = args.max_lens or ([1024, 4096] if args.quick else [256, 512, 1024, 2048, 4096, 8192])
    records = []
    for dim in dims:
        for max_len in max_lens:
            batch = max(1, TOKENS_PER_BATCH // max_len)
            for jagged in [layout == "jagged" for layout in args.layouts]:
                lengths = lengths_for(batch, max_len, jagged)
                fwd_flops = 2 * args.heads * dim * sum(length * length for length in lengths)
                for mask in args.masks:
                    for rab_mode in args.rab:
                        rab, rab_grad = rab_mode != "off", rab_mode == "on"
                        for backend in args.backends:
                            is_sdpa = backend.startswith("sdpa")
                            if is_sdpa and (mask != "causal" or rab):
                                continue  # softmax SDPA has no targets mask or rab: compared on plain causal only
                            if backend == "reference" and batch * args.heads * max_len**2 * 4 > REFERENCE_MAX_BYTES:
                                continue
                            for direction in args.directions:
                                rec = dict(
                                    backend=backend,
                                    device=torch.cuda.get_device_name(0),
                                    dtype=args.dtype,
                                    batch=batch,
                                    heads=args.heads,
                                    head_dim=dim,
                                    max_seq_len=max_len,
                                    jagged=jagged,
                                    mask=mask,
                                    rab=rab,
                                    rab_heads=args.rab_heads if rab else 0,
                                    rab_grad=rab_grad,
                                    direction=direction,
                                )
                                try:
                                    if is_sdpa:
                                        fn = sdpa_case(backend, lengths, args.heads, dim, direction, dtype)
                                    else:
                                        fn = hstu_case(
                                            backend,
                                            lengths,
                                            args.heads,
                                            dim,
                                            mask,
                                            rab,
                                            direction,
                                            args.rab_heads,
                                            rab_grad,
                                            dtype,
                                        )
                                    ms = clock_state_time_ms(fn, args.timing)
                                except Exception as e:  # a backend that cannot run a case is recorded, not fatal
                                    rec.update(ms=None, tflops=None, error=f"{type(e).__name__}: {e}"[:300])
                                else:
                                    flops = fwd_flops * (2.5 if direction == "bwd" else 1.0)
                                    rec.update(ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1))
                                records.append(rec)
                                print(json.dumps(rec), flush=True)
                                torch.cuda.empty_cache()
    meta = {
        # The kernel switches (GR_KERNELS_FWD_KERNEL, GR_KERNELS_BWD_KERNEL, GR_KERNELS_FWD_SPLITS, ...) change which
        # kernel a "cutlass" record measures, so they are part of the command.
        "command": " ".join(
            [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("GR_KERNELS_")]
            + ["python tools/bench_hstu_attention.py", *sys.argv[1:]]
        ),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gr_kernels": gr_kernels.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "flops": "fwd = 2*H*D*sum(L_i^2); bwd = 2.5 x fwd",
        "timing": f"{args.timing}: {TIMINGS[args.timing]}",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")
    table = markdown(meta, records)
    out.with_suffix(".md").write_text(table)
    plot(records, out.with_suffix(".png"))
    print(table)
    return 0


def markdown(meta: dict, records: list[dict]) -> str:
    lines = [
        f"# HSTU attention benchmark ({', '.join(_dtypes(records))}, TFLOP/s)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Device: {meta['device']}; torch {meta['torch']} (CUDA {meta['cuda']}); gr-kernels {meta['gr_kernels']}; "
        f"{meta['date']}. FLOPs: {meta['flops']}. "
        f"Timing: {meta.get('timing', 'back-to-back calls after 3 warmup ones')}.",
        "",
        "| head dim | max len | batch | jagged | mask | rab | dir | " + " | ".join(_backends(records)) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(_backends(records)),
    ]
    keys = ["head_dim", "max_seq_len", "batch", "jagged", "mask", "rab", "direction"]
    rows: dict[tuple, dict[str, dict]] = {}
    for r in records:
        # records without rab_grad (before --rab frozen) timed a trainable bias: drab was always computed then
        rows.setdefault((*(r[k] for k in keys), r.get("rab_grad", True)), {})[r["backend"]] = r
    for row_key, by_backend in rows.items():
        *key, rab_grad = row_key
        planes = next(iter(by_backend.values())).get("rab_heads", 1)  # records before the option: one shared plane
        if key[5]:  # the rab cell says frozen (no drab) and names a per-head bias
            key[5] = ("frozen" if not rab_grad else "True") + (f" ({planes} planes)" if planes > 1 else "")
        cells = []
        for b in _backends(records):
            r = by_backend.get(b)
            cells.append("-" if r is None else ("err" if r["tflops"] is None else f"{r['tflops']:.0f}"))
        lines.append("| " + " | ".join(str(x) for x in key) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _dtypes(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r.get("dtype", "bfloat16") for r in records))


def _backends(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["backend"] for r in records))


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for row, dim in enumerate((128, 256)):
        for col, direction in enumerate(("fwd", "bwd")):
            ax = axes[row][col]
            for backend in _backends(records):
                pts = sorted(
                    (r["max_seq_len"], r["tflops"])
                    for r in records
                    if r["backend"] == backend
                    and r["head_dim"] == dim
                    and r["direction"] == direction
                    and not r["jagged"]
                    and r["mask"] == "causal"
                    and not r["rab"]
                    and r["tflops"] is not None
                )
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=backend)
            ax.set_xscale("log", base=2)
            ax.set_title(f"head dim {dim}, {direction}, uniform causal")
            ax.set_xlabel("max sequence length")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
