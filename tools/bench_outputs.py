"""What the device-keeping benchmarks share: one ``{"runs": [...], "records": [...]}`` JSON per benchmark, where a run
on one device replaces that device's run and records and keeps every other device's, plus the .md/.png beside it;
and the CUDA-event timer of back-to-back calls."""

from __future__ import annotations

import json
import sys
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
