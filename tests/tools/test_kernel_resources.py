"""tools/kernel_resources.py's ptxas report and disassembly parsing on hand-made text: per-kernel registers, spills and
WGMMA notes, and the ``--sass`` counts of GMMAs, their waits and local memory, kept apart per kernel."""

from __future__ import annotations

import sys

import pytest

from tests.tools.tool_loader import load_tool

kernel_resources = load_tool("kernel_resources")

LISTING = """\
\t.section\t.text._Z3fooPf,"ax",@progbits
_Z3fooPf:
.text._Z3fooPf:
        /*0000*/                   WARPGROUP.ARRIVE ;
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR16], RZ, !UPT, gsb0 ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR16], R24, gsb0 ;
        /*0030*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0040*/               @P0 STL.64 [R1], R2 ;
        /*0050*/              @!P1 LDL R4, [R1+0x8] ;
        /*0060*/                   EXIT ;
\t.section\t.text._Z3barv,"ax",@progbits
.text._Z3barv:
        /*0000*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0010*/                   STS [R0], R1 ;
        /*0020*/                   LDS R2, [R0] ;
        /*0030*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0040*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0050*/                   EXIT ;
"""

REPORT = """\
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'
ptxas info    : Function properties for _Z3fooPf
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers
ptxas info    : Compiling entry function '_Z3barv' for 'sm_90a'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 90 registers
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to insufficient \
register resources for the wgmma pipeline in the function '_Z3barv'
"""


def test_sass_counts_per_kernel() -> None:
    counts = kernel_resources.sass_counts(LISTING)
    assert counts == {
        "_Z3fooPf": {"gmma": 2, "gmma_waits": 1, "local_stores": 1, "local_loads": 1},
        # STS / LDS (shared memory) are not local memory; both waits count.
        "_Z3barv": {"gmma": 1, "gmma_waits": 2, "local_stores": 0, "local_loads": 0},
    }
    assert kernel_resources.sass_counts("") == {}


@pytest.mark.parametrize("with_sass", [False, True])
def test_parse_rows_and_table(with_sass: bool) -> None:
    rows = kernel_resources.parse(REPORT, "csrc/hstu/x.cu", LISTING if with_sass else "")
    by_name = {r["kernel"].split("(")[0]: r for r in rows}  # demangled when c++filt exists: "foo(float*)"
    foo, bar = by_name.get("foo", by_name.get("_Z3fooPf")), by_name.get("bar", by_name.get("_Z3barv"))
    assert (foo["registers"], foo["stack"], foo["spill_stores"], foo["spill_loads"]) == (168, 16, 8, 4)
    assert foo["wgmma_warnings"] == [] and len(bar["wgmma_warnings"]) == 1
    text = kernel_resources.table(rows)
    if with_sass:
        assert (foo["gmma"], foo["gmma_waits"], bar["gmma_waits"]) == (2, 1, 2)
        assert "| HGMMA | GMMA waits | STL | LDL |" in text and "| 2 | 1 | 1 | 1 |" in text
    else:
        assert "gmma" not in foo and "HGMMA" not in text


def test_nvdisasm_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv("GR_KERNELS_NVDISASM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(kernel_resources.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "nvidia", None)  # no nvidia-cuda-nvdisasm wheel either
    with pytest.raises(SystemExit, match="needs nvdisasm"):
        kernel_resources.nvdisasm()
    monkeypatch.setenv("GR_KERNELS_NVDISASM", "/opt/x/nvdisasm")
    assert kernel_resources.nvdisasm() == "/opt/x/nvdisasm"


def test_kernel_missing_from_the_listing_shows_unknown_counts() -> None:
    only_foo = LISTING.split("\t.section\t.text._Z3barv")[0]
    rows = kernel_resources.parse(REPORT, "csrc/hstu/x.cu", only_foo)
    counted = [r for r in rows if "gmma" in r]
    assert len(counted) == 1 and counted[0]["gmma"] == 2
    assert "| ? | ? | ? | ? |" in kernel_resources.table(rows)
