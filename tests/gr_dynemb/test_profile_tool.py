"""tools/profile_dynemb_step.py: one tiny CPU run of both modes writes a well-formed summary."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "profile_dynemb_step.py"


def test_profile_tool_runs_both_modes(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("profile_dynemb_step", TOOL)
    tool = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(tool)  # type: ignore[union-attr]
    out = tmp_path / "prof.json"
    args = ["--device", "cpu", "--keys", "600", "--id-space", "500", "--tables", "3", "--dim", "8"]
    assert tool.main([*args, "--optimizer", "adagrad", "--warmup", "1", "--steps", "2", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["device"] == "cpu" and summary["args"]["tables"] == 3
    for mode in ("per_table", "grouped"):
        result = summary[mode]
        assert 0 < result["min_ms"] <= result["median_ms"]
        assert result["top_host_ops"] and all(op["count"] > 0 for op in result["top_host_ops"])
        assert result["kernel_launches"] == 0 and result["d2h_copies"] == 0  # no device on the CPU
