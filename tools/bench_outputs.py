"""What the device-keeping benchmarks share: one ``{"runs": [...], "records": [...]}`` JSON per benchmark, where a run
on one device replaces that device's run and records and keeps every other device's, plus the .md/.png beside it;
and the CUDA-event timers of back-to-back calls."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path


def saved_runs(out: Path) -> tuple[list[dict], list[dict]]:
    """What an earlier run wrote (older files hold one ``meta`` for the device of their records)."""
    path = out.with_suffix(".json")
    if not path.is_file():
        return [], []
    saved = json.loads(path.read_text())
    records = saved["records"]
    runs = saved.get("runs") or [{"device": records[0]["device"] if records else "cpu", **saved.get("meta", {})}]
    return runs, records


def merge_device_run(out: Path, meta: dict, records: list[dict]) -> tuple[list[dict], list[dict]]:
    """This run (``meta["device"]``) first, then the saved runs and records of every other device."""
    runs, kept = saved_runs(out)
    others = [r for r in runs if r.get("device", "cpu") != meta["device"]]
    return [meta, *others], [r for r in kept if r["device"] != meta["device"]] + records


def write_outputs(
    out: Path,
    runs: list[dict],
    records: list[dict],
    markdown: Callable[[list[dict], list[dict]], str],
    plot: Callable[[list[dict], Path], None],
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"runs": runs, "records": records}, indent=2) + "\n")
    md = markdown(runs, records)
    out.with_suffix(".md").write_text(md)
    try:
        plot(records, out.with_suffix(".png"))
    except ImportError:  # a GPU machine without matplotlib: --replot later
        print("matplotlib missing: no plot written", file=sys.stderr)
    print(md)


def cuda_time_ms(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    """Milliseconds per call of ``fn`` on the GPU (CUDA events around ``reps`` back-to-back calls, after ``warmup``
    untimed ones)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


# An H200 is power-capped (700 W): under load its SM clock falls from the 1980 MHz boost within ~0.1 s and settles
# 10-20% lower, the lower the more bytes a kernel moves, so a short window after other work lands anywhere on that
# ramp (a case timed after a heavier one read up to 10% slower). Two reproducible states instead (TIMINGS):
BURST_COOLDOWN_S = 0.5  # idle before a burst window: the clock is back at boost
BURST_WINDOW_MS = 25.0  # inside the ~0.1 s before the power limit bites
SUSTAINED_WARMUP_S = 1.0  # calls before a sustained window: the clock has settled under the power cap
SUSTAINED_WINDOW_MS = 500.0
TIMINGS = {
    "burst": f"after {BURST_COOLDOWN_S} s idle, calls for ~{BURST_WINDOW_MS:.0f} ms (boost clock)",
    "sustained": f"after {SUSTAINED_WARMUP_S} s of calls, calls for ~{SUSTAINED_WINDOW_MS:.0f} ms (clock settled under "
    "the power cap)",
}


def clock_state_time_ms(fn: Callable[[], object], timing: str) -> float:
    """Milliseconds per back-to-back call of ``fn`` in one of the clock states of ``TIMINGS``, after three untimed
    calls (compilation, autotuning, allocation) and one timed call that sizes the windows."""
    if timing not in TIMINGS:
        raise ValueError(f"timing must be one of {sorted(TIMINGS)}, got {timing!r}")
    for _ in range(3):
        fn()
    per_call = max(cuda_time_ms(fn, reps=1, warmup=0), 1e-3)
    if timing == "burst":
        time.sleep(BURST_COOLDOWN_S)
        return cuda_time_ms(fn, reps=max(3, min(100, round(BURST_WINDOW_MS / per_call))), warmup=0)
    warmup = max(1, math.ceil(SUSTAINED_WARMUP_S * 1e3 / per_call))
    return cuda_time_ms(fn, reps=max(3, math.ceil(SUSTAINED_WINDOW_MS / per_call)), warmup=warmup)


def run_gpu_bench(
    out: Path,
    replot: bool,
    bench: Callable[[], list[dict]],
    markdown: Callable[[list[dict], list[dict]], str],
    plot: Callable[[list[dict], Path], None],
) -> int:
    """The main of a single-GPU benchmark of Triton ops: ``replot`` rewrites the md/png from the saved JSON; else
    ``bench()`` runs on the current CUDA device and its records (tagged with the device) replace that device's run
    (meta: device, torch, triton, python, command). Returns the exit status (1 without a GPU)."""
    import json
    import platform

    import torch

    if replot:
        saved = json.loads(out.with_suffix(".json").read_text())
        write_outputs(out, saved["runs"], saved["records"], markdown, plot)
        return 0
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    import triton

    records = bench()
    meta = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), command="python " + " ".join(sys.argv))  # fmt: skip
    for r in records:
        r["device"] = meta["device"]
    write_outputs(out, *merge_device_run(out, meta, records), markdown, plot)
    return 0
