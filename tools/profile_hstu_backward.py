"""A few native HSTU attention backward calls on one uniform causal batch, for a profiler to take one of them.

The driver behind the Nsight Compute figures of the Hopper backward in ``packages/gr-kernels/README.md``:

    ncu --kernel-name regex:hstu_bwd_sm90 --launch-skip 1 --launch-count 1 --section SpeedOfLight \
        --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        --section SchedulerStats --page raw python tools/profile_hstu_backward.py --dim 128

The first call loads the module (skipped above); the profiler takes the second. ``--rab`` adds a trainable bias
plane shared by the heads (the backward then computes drab too), ``--rab frozen`` one that needs no gradient.

``--kernel-times`` times the calls under ``torch.profiler`` instead and prints every GPU kernel's time per backward
call (the backward kernel, the zeroing of dq's accumulator, its cast, any drab copy), e.g.

    python tools/profile_hstu_backward.py --dim 128 --rab --calls 10 --kernel-times
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling tools modules
from bench_outputs import cuda_time_ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=128, help="head dim")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument(
        "--rab",
        nargs="?",
        const="trainable",
        choices=["trainable", "frozen"],
        help="with a bias [batch, 1, seq_len, seq_len]: trainable (the default; drab too) or frozen",
    )
    ap.add_argument("--kernel-times", action="store_true", help="print each GPU kernel's time per call (profiler)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import gr_kernels

    rows = args.batch * args.seq_len
    q, k, v = (
        (torch.randn(rows, args.heads, args.dim, device="cuda", dtype=torch.bfloat16) * 0.5).requires_grad_()
        for _ in range(3)
    )
    offsets = torch.arange(0, rows + 1, args.seq_len, device="cuda")
    rab = None
    if args.rab:
        rab = torch.randn(args.batch, 1, args.seq_len, args.seq_len, device="cuda", dtype=torch.bfloat16) * 0.1
        rab.requires_grad_(args.rab == "trainable")
    out = gr_kernels.hstu_attention(
        q, k, v, offsets, args.seq_len, alpha=args.dim**-0.5, rab=rab, backend="cutlass", validate=False
    )
    grad = torch.randn_like(out)
    inputs = (q, k, v, rab) if args.rab == "trainable" else (q, k, v)

    def backward() -> None:
        torch.autograd.grad(out, inputs, grad, retain_graph=True)

    if args.kernel_times:
        print_kernel_times(backward, args.calls)
        return 0
    for _ in range(args.calls):
        backward()
    torch.cuda.synchronize()
    return 0


def print_kernel_times(call, calls: int) -> None:
    """Runs ``call`` once to warm up, ``calls`` times timed by CUDA events (the stream's time per call, gaps between
    kernels included), then ``calls`` times under the profiler; prints each GPU kernel's mean time per call, the
    largest first, their sum and the timed calls' mean."""
    from torch.profiler import ProfilerActivity, profile

    stream_ms = cuda_time_ms(call, reps=calls, warmup=1)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        total_us = getattr(event, "self_device_time_total", None)
        if total_us is None:  # torch < 2.4 names it after CUDA
            total_us = event.self_cuda_time_total
        if total_us > 0:
            rows.append((total_us / calls / 1000, event.count / calls, event.key))
    rows.sort(reverse=True)
    print(f"{'ms / call':>10} {'launches':>9}  kernel")
    for ms, launches, name in rows:
        print(f"{ms:10.3f} {launches:9.1f}  {name[:100]}")
    print(f"{sum(r[0] for r in rows):10.3f} {'':9}  all kernels")
    print(f"{stream_ms:10.3f} {'':9}  one call on the stream (CUDA events, without the profiler)")


if __name__ == "__main__":
    sys.exit(main())
