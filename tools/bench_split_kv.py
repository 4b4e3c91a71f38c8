"""Benchmark of the split-KV native forward on delta-q calls (a few query rows against a long cached history).

For each (batch, query rows) it times the ``cutlass`` forward of ``hstu_attention`` with delta q (``q_offsets``)
at every split setting (``GR_KERNELS_FWD_SPLITS``: 1 = the unsplit kernel, ``auto`` = the heuristic of
``gr_kernels.split_kv``, and forced counts), replaying a CUDA graph of the call so launch overhead is not measured.
The numbers decide whether ``gr_kernels.split_kv.SPLIT_KV_DEFAULT`` should be on.

Writes ``docs/benchmarks/split_kv.{json,md,png}`` (``--out`` prefix) and prints the table.

    python tools/bench_split_kv.py                                  # issue 7's shapes: history 4096, 4 heads, dim 128
    python tools/bench_split_kv.py --history 1024 --batches 1 --q-lens 1 256 --splits 1 auto 8
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling tools modules
from bench_outputs import merge_device_run, write_outputs

from gr_kernels import hstu_attention
from gr_kernels.split_kv import FWD_SPLITS_ENV, forced_fwd_splits, heuristic_fwd_splits, num_sms

REPO = Path(__file__).resolve().parents[1]


def time_call(fn, reps: int) -> float:
    """Microseconds per call of ``fn`` replayed from a CUDA graph."""
    for _ in range(3):
        fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000.0 / reps


def bench(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cuda")
    heads, dim, history = args.heads, args.dim, args.history
    records = []
    for batch in args.batches:
        for q_len in args.q_lens:
            kv = history + q_len
            gen = torch.Generator(device="cuda").manual_seed(0)
            k = torch.randn(batch * kv, heads, dim, device=device, dtype=torch.bfloat16, generator=gen)
            v = torch.randn(batch * kv, heads, dim, device=device, dtype=torch.bfloat16, generator=gen)
            q = torch.randn(batch * q_len, heads, dim, device=device, dtype=torch.bfloat16, generator=gen)
            seq_offsets = torch.arange(batch + 1, device=device) * kv
            q_offsets = torch.arange(batch + 1, device=device) * q_len

            call = functools.partial(hstu_attention, q, k, v, seq_offsets, kv, alpha=dim**-0.5, q_offsets=q_offsets,
                                     max_q_len=q_len, validate=False, backend="cutlass")  # fmt: skip
            for setting in args.splits:
                os.environ[FWD_SPLITS_ENV] = setting
                forced = forced_fwd_splits()
                auto = heuristic_fwd_splits(batch, heads, q_len, kv, dim, num_sms(device))
                used = forced if isinstance(forced, int) else auto
                us = time_call(call, args.reps)
                records.append(dict(device=torch.cuda.get_device_name(device), batch=batch, heads=heads,
                                    head_dim=dim, history=history, q_len=q_len, setting=setting, splits=used,
                                    us=round(us, 2)))  # fmt: skip
                print(f"B={batch} q_len={q_len} splits={setting} ({used}): {us:.1f} us", flush=True)
    os.environ.pop(FWD_SPLITS_ENV, None)
    return records


def markdown(runs: list[dict], records: list[dict]) -> str:
    lines = ["# Split-KV forward (delta q), microseconds per call (CUDA graph replay)", ""]
    for run in runs:
        lines.append(f"- {run['device']}: torch {run['torch']}, Python {run['python']}; `{run['command']}`")
    lines.append("")
    settings = list(dict.fromkeys(r["setting"] for r in records))
    lines.append("| device | batch | q rows | history | " + " | ".join(f"splits={s}" for s in settings) + " |")
    lines.append("|---" * (4 + len(settings)) + "|")
    cases = dict.fromkeys((r["device"], r["batch"], r["q_len"], r["history"]) for r in records)
    for dev, batch, q_len, history in cases:
        cells = []
        for s in settings:
            hit = [r for r in records if (r["device"], r["batch"], r["q_len"], r["history"], r["setting"]) ==
                   (dev, batch, q_len, history, s)]  # fmt: skip
            cells.append(f"{hit[0]['us']:.1f} ({hit[0]['splits']})" if hit else "")
        lines.append(f"| {dev} | {batch} | {q_len} | {history} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: us per call (split count used).", ""]
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    cases = dict.fromkeys((r["device"], r["batch"], r["q_len"]) for r in records)
    for dev, batch, q_len in cases:
        rows = sorted((r for r in records if (r["device"], r["batch"], r["q_len"]) == (dev, batch, q_len)),
                      key=lambda r: r["splits"])  # fmt: skip
        ax.plot([r["splits"] for r in rows], [r["us"] for r in rows], marker="o", label=f"{dev} B={batch} q={q_len}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("key splits")
    ax.set_ylabel("us per forward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--history", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128, choices=[64, 128, 256])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--q-lens", type=int, nargs="+", default=[1, 128, 256])
    ap.add_argument("--splits", nargs="+", default=["1", "auto", "4", "8", "16", "32"])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "split_kv")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    records = bench(args)
    meta = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, python=platform.python_version(),
                command="python " + " ".join(sys.argv))  # fmt: skip
    runs, all_records = merge_device_run(args.out, meta, records)
    write_outputs(args.out, runs, all_records, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
