"""A few native HSTU attention backward calls on one uniform causal batch, for a profiler to take one of them.

The driver behind the Nsight Compute figures of the Hopper backward in ``packages/gr-kernels/README.md``:

    ncu --kernel-name regex:hstu_bwd_sm90 --launch-skip 1 --launch-count 1 --section SpeedOfLight \
        --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        --section SchedulerStats --page raw python tools/profile_hstu_backward.py --dim 128

The first call loads the module (skipped above); the profiler takes the second. ``--rab`` adds a trainable bias
plane shared by the heads (the backward then computes drab too).
"""

from __future__ import annotations

import argparse
import sys

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=128, help="head dim")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--rab", action="store_true", help="with a trainable bias [batch, 1, seq_len, seq_len] (drab too)")
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
        rab.requires_grad_()
    out = gr_kernels.hstu_attention(
        q, k, v, offsets, args.seq_len, alpha=args.dim**-0.5, rab=rab, backend="cutlass", validate=False
    )
    grad = torch.randn_like(out)
    inputs = (q, k, v, rab) if args.rab else (q, k, v)
    for _ in range(args.calls):
        torch.autograd.grad(out, inputs, grad, retain_graph=True)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
