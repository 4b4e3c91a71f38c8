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
