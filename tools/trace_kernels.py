"""GPU kernel time of a profiled step by the operator that launched it, from a Chrome trace (``torch.profiler``'s
``export_chrome_trace``, e.g. ``tools/bench_parallel.py --profile --trace FILE``).

Each kernel is matched to its launching CPU op through the trace's ``External id`` (the innermost op with that id),
so the table says which part of the model a kernel time belongs to (e.g. ``aten::cat`` under ``SplitWithSizesBackward0``
vs. a forward ``aten::cat``): columns ms, calls, op, autograd node (the enclosing ``evaluate_function`` range on the
same thread, for backward kernels) and the kernel's name.

Before the table, a timeline summary per trace: its span, the time the GPU was busy (the union of kernels, copies
and memsets over all streams) and idle, and the kernel time launched from CUDA graphs, by NCCL and otherwise
(``--steps N``: also per step, for a trace of N profiled steps).

    python tools/trace_kernels.py trace.json --top 40
    python tools/trace_kernels.py base.json new.json      # two traces side by side (ms per row), largest change first
    python tools/trace_kernels.py t.json --steps 3        # the summary per step too
    python tools/trace_kernels.py t.json --host-range "[splits_dist]"   # host time inside ranges of that prefix
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
from pathlib import Path

Key = tuple[str, str, str]


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def kernel_times(events: list[dict], name_width: int = 70) -> tuple[dict[Key, float], dict[Key, int]]:
    """Microseconds and call counts per (op, autograd node, kernel name)."""
    ops = [e for e in events if e.get("cat") == "cpu_op" and "dur" in e]
    by_id: dict[object, dict] = {}
    for e in ops:
        ext = e.get("args", {}).get("External id")
        if ext is not None and (ext not in by_id or e["dur"] < by_id[ext]["dur"]):
            by_id[ext] = e  # the innermost op of that id
    # Backward ranges per thread, sorted by start, to name the autograd node around an op.
    nodes: dict[object, list[dict]] = collections.defaultdict(list)
    for e in ops:
        if e["name"].startswith("autograd::engine::evaluate_function: "):
            nodes[e["tid"]].append(e)
    starts = {tid: [n["ts"] for n in sorted(v, key=lambda n: n["ts"])] for tid, v in nodes.items()}
    for tid in nodes:
        nodes[tid].sort(key=lambda n: n["ts"])

    def node_of(op: dict) -> str:
        ranges, ts = nodes.get(op["tid"], []), starts.get(op["tid"], [])
        i = bisect.bisect_right(ts, op["ts"]) - 1
        if i >= 0 and ranges[i]["ts"] + ranges[i]["dur"] >= op["ts"] + op["dur"]:
            return ranges[i]["name"].split(": ", 1)[1]
        return ""

    time: dict[Key, float] = collections.Counter()
    calls: dict[Key, int] = collections.Counter()
    for k in events:
        if k.get("cat") != "kernel":
            continue
        op = by_id.get(k.get("args", {}).get("External id"))
        key = ("?", "", k["name"][:name_width]) if op is None else (op["name"], node_of(op), k["name"][:name_width])
        time[key] += k["dur"]
        calls[key] += 1
    return time, calls


def timeline(events: list[dict]) -> dict[str, float]:
    """Milliseconds: ``span`` (first device activity to last), ``busy`` (union over streams), ``idle``, and kernel
    time by launcher: ``graph`` (replayed CUDA graphs), ``nccl`` (NCCL kernels launched eagerly), ``other``."""
    device = sorted(
        (e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
        key=lambda e: e["ts"],
    )
    if not device:
        return {"span": 0.0, "busy": 0.0, "idle": 0.0, "graph": 0.0, "nccl": 0.0, "other": 0.0}
    launchers = {
        e["args"]["correlation"]: e["name"]
        for e in events
        if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})
    }
    busy, start, end = 0.0, device[0]["ts"], device[0]["ts"]
    for e in device:
        if e["ts"] > end:
            busy += end - start
            start = e["ts"]
        end = max(end, e["ts"] + e["dur"])
    busy += end - start
    span = end - device[0]["ts"]
    by = collections.Counter()
    for e in device:
        if e.get("cat") != "kernel":
            continue
        launcher = launchers.get(e.get("args", {}).get("correlation"), "")
        kind = "graph" if "Graph" in launcher else "nccl" if "nccl" in e["name"].lower() else "other"
        by[kind] += e["dur"]
    return {"span": span / 1e3, "busy": busy / 1e3, "idle": (span - busy) / 1e3,
            **{k: by[k] / 1e3 for k in ("graph", "nccl", "other")}}  # fmt: skip


def host_range_ms(events: list[dict], prefix: str) -> float:
    """Host milliseconds inside CPU ranges (ops or ``record_function`` ranges) whose name starts with ``prefix``,
    nested ones counted once."""
    ranges = sorted(
        (e for e in events if e.get("cat") in ("cpu_op", "user_annotation") and e.get("name", "").startswith(prefix)),
        key=lambda e: (e["tid"], e["ts"]),
    )
    total, tid, end = 0.0, None, -1.0
    for e in ranges:
        if e["tid"] != tid:
            tid, end = e["tid"], -1.0
        start, stop = max(e["ts"], end), e["ts"] + e["dur"]
        if stop > start:
            total += stop - start
            end = stop
    return total / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="+", type=Path, help="one trace, or two to compare")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--steps", type=int, default=1, help="profiled steps in each trace (the summary per step too)")
    ap.add_argument("--host-range", action="append", default=[], help="also the host time in ranges of this prefix")
    args = ap.parse_args()
    if len(args.traces) > 2:
        ap.error("give one trace, or two to compare")
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    tables = []
    for path in args.traces:
        events = load_events(path)
        tables.append(kernel_times(events))
        time = tables[-1][0]
        print(f"{path}: {sum(time.values()) / 1e3:.2f} ms of kernels, {len(time)} (op, node, kernel) rows")
        t = timeline(events)
        line = ", ".join(f"{k} {v:.2f}" for k, v in t.items())
        print(f"  timeline ms: {line}")
        if args.steps > 1:
            print(f"  per step ({args.steps}): " + ", ".join(f"{k} {v / args.steps:.2f}" for k, v in t.items()))
        for prefix in args.host_range:
            ms = host_range_ms(events, prefix)
            print(f"  host ms in {prefix!r}: {ms:.2f} ({ms / args.steps:.2f} per step)")
    if len(tables) == 1:
        time, calls = tables[0]
        print("\n| ms | calls | op | autograd node | kernel |\n|---|---|---|---|---|")
        for key, us in sorted(time.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"| {us / 1e3:.2f} | {calls[key]} | {key[0]} | {key[1]} | `{key[2]}` |")
        return
    (a, ca), (b, cb) = tables
    keys = sorted(set(a) | set(b), key=lambda k: -abs(b.get(k, 0.0) - a.get(k, 0.0)))
    print("\n| ms (1st) | ms (2nd) | change | calls | op | autograd node | kernel |\n|---|---|---|---|---|---|---|")
    for key in keys[: args.top]:
        ta, tb = a.get(key, 0.0) / 1e3, b.get(key, 0.0) / 1e3
        calls = f"{ca.get(key, 0)}/{cb.get(key, 0)}"
        print(f"| {ta:.2f} | {tb:.2f} | {tb - ta:+.2f} | {calls} | {key[0]} | {key[1]} | `{key[2]}` |")


if __name__ == "__main__":
    main()
