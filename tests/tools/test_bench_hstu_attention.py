"""tools/bench_hstu_attention.py's table without a GPU: a per-head bias (``--rab-heads``) is named in the rab column,
a shared one and records from before the option read as plain True/False, and the option is checked."""

from __future__ import annotations

import sys

import pytest

from tests.tools.tool_loader import load_tool

bench = load_tool("bench_hstu_attention")
META = dict(command="python tools/bench_hstu_attention.py", device="GPU", torch="2", cuda="13", gr_kernels="0",
            date="2026-11-30", flops="fwd = 2*H*D*sum(L_i^2); bwd = 2.5 x fwd")  # fmt: skip


def record(rab: bool, tflops: float, **extra) -> dict:
    base = dict(backend="cutlass", batch=32, heads=4, head_dim=128, max_seq_len=4096, jagged=False, mask="causal",
                rab=rab, direction="bwd", ms=1.0, tflops=tflops)  # fmt: skip
    return {**base, **extra}


def table_rows(records: list[dict]) -> list[str]:
    return [line for line in bench.markdown(META, records).splitlines() if line.startswith("| 128 ")]


def test_per_head_bias_is_named_in_the_rab_column() -> None:
    rows = table_rows([record(False, 250.0, rab_heads=0), record(True, 180.0, rab_heads=4)])
    assert rows == [
        "| 128 | 4096 | 32 | False | causal | False | bwd | 250 |",
        "| 128 | 4096 | 32 | False | causal | True (4 planes) | bwd | 180 |",
    ]


def test_shared_bias_and_older_records_read_true_false() -> None:
    rows = table_rows([record(True, 200.0, rab_heads=1), record(False, 250.0)])
    assert rows == [
        "| 128 | 4096 | 32 | False | causal | True | bwd | 200 |",
        "| 128 | 4096 | 32 | False | causal | False | bwd | 250 |",
    ]


def test_rab_heads_must_be_one_or_the_head_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_hstu_attention.py", "--heads", "4", "--rab-heads", "3"])
    with pytest.raises(SystemExit) as err:
        bench.main()
    assert err.value.code == 2  # argparse's usage error


def test_markdown_names_the_dtype_and_the_timing() -> None:
    meta = {**META, "timing": "burst: after 0.5 s idle"}
    head = bench.markdown(meta, [record(False, 250.0, dtype="float16")]).splitlines()
    assert head[0] == "# HSTU attention benchmark (float16, TFLOP/s)"
    assert "Timing: burst: after 0.5 s idle." in head[3]


class FakeClock:
    """Stands in for the CUDA-event timer and the idle pause: records each window's warmup and reps."""

    def __init__(self, per_call_ms: float) -> None:
        self.per_call_ms, self.windows, self.slept = per_call_ms, [], 0.0

    def time_ms(self, fn, reps: int, warmup: int = 2) -> float:
        self.windows.append((warmup, reps))
        return self.per_call_ms

    def sleep(self, seconds: float) -> None:
        self.slept += seconds


@pytest.mark.parametrize(("per_call_ms", "burst_reps"), [(3.0, 8), (8.0, 3), (0.01, 100)])
def test_clock_states_size_their_windows(monkeypatch: pytest.MonkeyPatch, per_call_ms: float, burst_reps: int) -> None:
    outputs = sys.modules["bench_outputs"]
    clock, calls = FakeClock(per_call_ms), []
    monkeypatch.setattr(outputs, "cuda_time_ms", clock.time_ms)
    monkeypatch.setattr(outputs.time, "sleep", clock.sleep)
    assert outputs.clock_state_time_ms(lambda: calls.append(1), "burst") == per_call_ms
    # three untimed calls, one sizing call, then (after the idle pause) the window alone
    assert len(calls) == 3 and clock.windows == [(0, 1), (0, burst_reps)] and clock.slept == outputs.BURST_COOLDOWN_S
    clock.windows.clear()
    outputs.clock_state_time_ms(lambda: None, "sustained")
    (_, _), (warmup, reps) = clock.windows
    assert warmup * per_call_ms >= outputs.SUSTAINED_WARMUP_S * 1e3
    assert reps * per_call_ms >= outputs.SUSTAINED_WINDOW_MS


def test_unknown_timing_is_refused() -> None:
    with pytest.raises(ValueError, match="timing must be one of"):
        sys.modules["bench_outputs"].clock_state_time_ms(lambda: None, "fast")
