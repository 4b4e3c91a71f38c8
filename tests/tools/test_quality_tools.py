"""The multi-seed aggregation of tools/run_ml100k_quality.py and tools/sweep_retrieval.py on hand-made records."""

from __future__ import annotations

import argparse

import pytest

from tests.tools.tool_loader import load_tool

sweep = load_tool("sweep_retrieval")
quality = load_tool("run_ml100k_quality")


def _record(variant: str, seed: int, ndcg: float, hr: float) -> dict:
    metrics = {m: 0.0 for m in quality.METRICS} | {"ndcg@10": ndcg, "hr@10": hr}
    return {
        "variant": variant,
        "seed": seed,
        "test": metrics,
        "val": dict(metrics),
        "best_epoch": 10 * seed,
        "epochs": 10 * seed + 40,
        "train_wall_s": 100.0 * seed,
        "train_sequences_per_s": 50.0,
        "train_tokens_per_s": 5000.0,
        "device": "cpu",
    }


def test_aggregate_means_stds_and_per_seed_verdicts() -> None:
    runs = [
        _record("hstu", 1, 0.10, 0.20),
        _record("hstu", 2, 0.09, 0.18),
        {"variant": "hstu", "seed": 3, "error": "x"},
    ]
    agg = quality.aggregate(runs)
    assert agg["test"]["ndcg@10"] == pytest.approx(0.095)
    assert agg["test_std"]["ndcg@10"] == pytest.approx(0.00707107, rel=1e-5)
    assert agg["seeds"] == [1, 2] and agg["failed_seeds"] == [3]
    assert agg["best_epoch"] == 15 and agg["epochs"] == 55 and agg["wall_s"] == 150.0
    assert quality.meets(agg["test"])  # 0.095 / 0.19: exactly on and above the bar
    assert [quality.meets(r["test"]) for r in agg["runs"]] == [True, False]
    md = quality.markdown(
        {"machine": {"processor": "x", "cpu_count": 2, "torch": "t", "torch_threads": 1}, "hstu": agg}, "cmd"
    )
    assert "**met**" in md and "1 of 2 seeds meet it" in md


def test_aggregate_without_finished_runs_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no run finished"):
        quality.aggregate([{"variant": "hstu", "seed": 1, "error": "boom"}])


def test_sweep_summary_and_variant_parsing() -> None:
    summary = sweep.summarize([_record("a", 1, 0.1, 0.2), _record("a", 2, 0.3, 0.4), _record("b", 1, 0.5, 0.6)])
    assert summary["a"]["test/ndcg@10"] == pytest.approx({"mean": 0.2, "std": 0.1414214, "min": 0.1, "max": 0.3})
    assert summary["b"]["runs"] == 1 and summary["b"]["test/hr@10"]["std"] == 0.0
    assert sweep.parse_variant("x=a.b=1;c.d=2") == ("x", ["a.b=1", "c.d=2"])
    assert sweep.parse_variant("base=") == ("base", [])
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=OVERRIDE"):
        sweep.parse_variant("no-equals")
