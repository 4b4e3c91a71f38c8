"""Representative native HSTU attention calls for ``compute-sanitizer --tool memcheck``.

Ragged lengths (0, 1, tile edges, not a multiple of the tile), every mask family, rab shared and per head (bias rows
aligned and not), forward and backward, both dtypes and every head dim; the forward through both native forward
kernels (the SM80-MMA one and the Hopper WGMMA/TMA one, chosen with GR_KERNELS_FWD_KERNEL). Exits non-zero if an
output differs from the reference by more than a loose bound (the sanitizer itself reports memory errors).

    compute-sanitizer --tool memcheck --error-exitcode 1 python tools/memcheck_hstu_attention.py
"""

from __future__ import annotations

import os
import sys

import torch

import gr_kernels

CASES = [
    {},
    {"causal": False, "max_attn_len": 20},
    {"contextual_seq_len": 3, "num_targets": 5, "target_group_size": 2},
    {"max_attn_len": 7, "num_targets": 2},
]


def main() -> int:
    if not (torch.cuda.is_available() and gr_kernels.native_available()):
        print("needs a CUDA GPU and the compiled kernels", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    lengths = [0, 1, 63, 64, 65, 130]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    total, worst = sum(lengths), 0.0
    # max_seq_len 130 (bias rows not 16-byte aligned: head dims 64 / 128 take the SM80 backward with a bias) and 136
    # (aligned: the Hopper backward loads the bias through TMA).
    for n, dtype in ((max(lengths), torch.bfloat16), (136, torch.bfloat16), (136, torch.float16)):
        for dim in (64, 128, 256):
            for kw in CASES:
                for rab_heads in (0, 1, 2):
                    q, k, v = (
                        torch.randn(total, 2, dim, device="cuda", dtype=dtype, requires_grad=True) for _ in "qkv"
                    )
                    rab = None
                    if rab_heads:
                        rab = torch.randn(len(lengths), rab_heads, n, n, device="cuda", dtype=dtype, requires_grad=True)
                    kw2 = dict(kw)
                    if "num_targets" in kw2:
                        kw2["num_targets"] = torch.tensor(
                            [min(kw["num_targets"], max(x - 1, 0)) for x in lengths]
                        ).cuda()
                    leaves = [q, k, v] + ([rab] if rab is not None else [])
                    outs = {}
                    for backend in ("reference", "sm80", "sm90"):
                        os.environ["GR_KERNELS_FWD_KERNEL"] = backend
                        name = "reference" if backend == "reference" else "cutlass"
                        out = gr_kernels.hstu_attention(q, k, v, offsets, n, alpha=0.3, rab=rab, backend=name, **kw2)
                        # The backward is the same native kernel either way: run it once, after the SM80 forward.
                        grads = [] if backend == "sm90" else torch.autograd.grad(out.float().sum(), leaves)
                        outs[backend] = [out, *grads]
                    os.environ.pop("GR_KERNELS_FWD_KERNEL", None)
                    for backend in ("sm80", "sm90"):
                        for got, want in zip(outs[backend], outs["reference"], strict=False):
                            err = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
                            worst = max(worst, err)
    torch.cuda.synchronize()
    print(f"max |cutlass - reference| over all cases: {worst:.3e}")
    return 0 if worst < 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
