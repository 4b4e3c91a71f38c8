"""tools/trace_kernels.py's timeline summary on a hand-made trace: span and busy time over overlapping streams, and
kernel time split by launcher (a replayed CUDA graph, NCCL, other); memcpys count as busy, not as kernel time."""

from __future__ import annotations

import pytest

from tests.tools.tool_loader import load_tool

trace_kernels = load_tool("trace_kernels")


def _device(cat: str, name: str, ts: float, dur: float, corr: int) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}


def _runtime(name: str, corr: int) -> dict:
    return {"ph": "X", "cat": "cuda_runtime", "name": name, "ts": 0.0, "dur": 1.0, "args": {"correlation": corr}}


def test_timeline_busy_idle_and_launchers() -> None:
    events = [
        _runtime("cudaLaunchKernel", 1),
        _runtime("cudaGraphLaunch", 2),
        _runtime("cudaLaunchKernel", 3),
        _runtime("cudaMemcpyAsync", 4),
        _device("kernel", "vectorized_elementwise_kernel", 1000.0, 1000.0, 1),  # 1.0-2.0 ms
        _device("kernel", "layer_norm_mul_fwd_kernel", 1500.0, 2000.0, 2),  # 1.5-3.5 ms, another stream, overlaps
        _device("kernel", "ncclDevKernel_SendRecv", 5000.0, 500.0, 3),  # 5.0-5.5 ms, after 1.5 ms idle
        _device("gpu_memcpy", "Memcpy DtoD", 5500.0, 500.0, 4),  # 5.5-6.0 ms
    ]
    t = trace_kernels.timeline(events)
    assert t["span"] == pytest.approx(5.0)
    assert t["busy"] == pytest.approx(3.5)
    assert t["idle"] == pytest.approx(1.5)
    assert (t["graph"], t["nccl"], t["other"]) == (pytest.approx(2.0), pytest.approx(0.5), pytest.approx(1.0))


def test_timeline_of_a_trace_without_device_events_is_zero() -> None:
    assert set(trace_kernels.timeline([_runtime("cudaLaunchKernel", 1)]).values()) == {0.0}


def test_host_range_counts_nested_and_overlapping_ranges_once_per_thread() -> None:
    def cpu(name: str, tid: int, ts: float, dur: float) -> dict:
        return {"ph": "X", "cat": "user_annotation", "name": name, "tid": tid, "ts": ts, "dur": dur}

    events = [
        cpu("[splits_dist]_[a]", 1, 0.0, 4000.0),
        cpu("[splits_dist]_[a] inner", 1, 1000.0, 1000.0),  # nested: already counted
        cpu("[splits_dist]_[b]", 1, 3000.0, 2000.0),  # overlaps the first by 1 ms
        cpu("[splits_dist]_[c]", 2, 0.0, 500.0),  # another thread
        cpu("[lookup]_[a]", 1, 6000.0, 9000.0),  # another prefix
    ]
    assert trace_kernels.host_range_ms(events, "[splits_dist]") == pytest.approx(5.5)
