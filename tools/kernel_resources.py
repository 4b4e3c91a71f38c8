"""Registers, spills, stack and ptxas's WGMMA warnings of gr-kernels' native CUDA kernels, without a GPU.

Kernel tiles on Hopper are register plans: a tile that does not fit spills to local memory or makes ptxas serialise
the warpgroup MMAs ("insufficient register resources"), and either costs far more than a smaller tile. This compiles
the chosen sources (default: the Hopper backward ones) the way the package build does, with ``-Xptxas -v``, and
tabulates what ptxas reports for every kernel instantiation (demangled and shortened). ``-D NAME=VALUE`` passes
defines through, so a tile change can be checked before it costs device time.

    python tools/kernel_resources.py                                   # csrc/hstu/bwd_sm90_hdim*.cu
    python tools/kernel_resources.py csrc/hstu/fwd_sm90_hdim128.cu     # any source of packages/gr-kernels
    python tools/kernel_resources.py --json out.json                   # the rows as JSON too

    python tools/kernel_resources.py --sass                            # + GMMA / wait / local-memory counts

``--sass`` also disassembles each kernel (``nvdisasm``: on PATH, ``GR_KERNELS_NVDISASM``, or the
``nvidia-cuda-nvdisasm`` wheel) and counts its warpgroup MMAs (``HGMMA``), the waits on them
(``WARPGROUP.DEPBAR``) and its local-memory stores and loads (``STL`` / ``LDL``). ptxas says "serialized" only for
some register shortfalls; a kernel whose GMMAs each get a wait of their own runs them one at a time as well (session
26: 120 GMMAs, a wait after each, until the loop body was restructured; 40 GMMAs and 5 waits after), and only the
disassembly shows it.

Exit status 1 when any kernel spills or has its WGMMAs serialised.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "packages" / "gr-kernels"
DEFAULT_SOURCES = ("csrc/hstu/bwd_sm90_hdim64.cu", "csrc/hstu/bwd_sm90_hdim128.cu", "csrc/hstu/bwd_sm90_hdim256.cu")

_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>[^']+)'")
_FRAME = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads"
)
_USED = re.compile(r"Used (?P<regs>\d+) registers")
# e.g. "(C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to insufficient register
# resources for the wgmma pipeline in the function '_Z...'" (printed as info, naming the function).
_WGMMA = re.compile(r"wgmma.*(serializ|Performance Loss)|Performance Loss.*wgmma", re.IGNORECASE)
_QUOTED = re.compile(r"'(_Z[^']+)'")


def cutlass_include() -> str:
    """The CUTLASS/CuTe headers the build uses (``GR_KERNELS_CUTLASS_INCLUDE``, else the nvidia-cutlass wheel's)."""
    env = os.environ.get("GR_KERNELS_CUTLASS_INCLUDE")
    if env:
        return env
    try:
        import cutlass_library
    except ImportError:
        raise SystemExit(
            "no CUTLASS headers: pip install nvidia-cutlass (the package build's own copy lives in its isolated build "
            "environment) or set GR_KERNELS_CUTLASS_INCLUDE"
        ) from None
    return str(Path(cutlass_library.__file__).parent / "source" / "include")


def nvdisasm() -> str:
    """The ``nvdisasm`` binary: ``GR_KERNELS_NVDISASM``, else on PATH, else the ``nvidia-cuda-nvdisasm`` wheel's."""
    env = os.environ.get("GR_KERNELS_NVDISASM")
    if env:
        return env
    found = shutil.which("nvdisasm")
    if found:
        return found
    try:
        import nvidia

        for root in nvidia.__path__:
            for candidate in sorted(Path(root).glob("*/bin/nvdisasm")):
                return str(candidate)
    except ImportError:
        pass
    raise SystemExit(
        "--sass needs nvdisasm: put the CUDA toolkit's on PATH, pip install nvidia-cuda-nvdisasm, or set "
        "GR_KERNELS_NVDISASM"
    )


def compile_source(source: str, arch: str, defines: list[str], sass: bool = False) -> tuple[str, str]:
    """ptxas's verbose report (stderr) of compiling one source for ``arch``, as the package build would, and with
    ``sass`` the disassembly of the resulting cubin (``nvdisasm -c``; else "")."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise SystemExit("nvcc not found on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / ("out.cubin" if sass else "out.o")
        cmd = [
            nvcc, "-std=c++17", f"-arch=sm_{arch}", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas", "-v",
            "-DGR_KERNELS_SM90=1", f"-I{PACKAGE / 'csrc'}", f"-I{cutlass_include()}",
            *(f"-D{d}" for d in defines), "-cubin" if sass else "-c", str(PACKAGE / source), "-o", str(out),
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"nvcc failed on {source}:\n{done.stderr[-4000:]}")
        listing = ""
        if sass:
            dis = subprocess.run([nvdisasm(), "-c", str(out)], capture_output=True, text=True)
            if dis.returncode != 0:
                raise SystemExit(f"nvdisasm failed on {source}:\n{dis.stderr[-4000:]}")
            listing = dis.stdout
    return done.stderr, listing


# nvdisasm -c: each kernel's code starts at a label line ".text.<mangled name>:"; instructions follow as
# "/*0a10*/   OPCODE operands ;" (an optional "@P0" predicate before the opcode).
_SASS_FUNCTION = re.compile(r"^\.text\.(?P<name>\S+):\s*$")
_SASS_OPCODE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?(?P<op>[A-Z][A-Z0-9_.]*)")
SASS_COUNTS = {"gmma": "HGMMA", "gmma_waits": "WARPGROUP.DEPBAR", "local_stores": "STL", "local_loads": "LDL"}


def sass_counts(listing: str) -> dict[str, dict[str, int]]:
    """Per kernel (mangled name) of an ``nvdisasm -c`` listing: its HGMMA, WARPGROUP.DEPBAR, STL and LDL counts
    (an opcode counts under every key it starts with: ``HGMMA.64x128x16.F32.BF16`` is an HGMMA)."""
    counts: dict[str, dict[str, int]] = {}
    current: dict[str, int] | None = None
    for line in listing.splitlines():
        if m := _SASS_FUNCTION.match(line):
            current = counts.setdefault(m["name"], dict.fromkeys(SASS_COUNTS, 0))
        elif current is not None and (m := _SASS_OPCODE.match(line)):
            op = m["op"]
            for key, prefix in SASS_COUNTS.items():
                if op == prefix or op.startswith(prefix + "."):
                    current[key] += 1
    return counts


def demangle(names: list[str]) -> list[str]:
    """Readable kernel names (c++filt when present), with CuTe's long template arguments cut down."""
    if not names or shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    short = []
    for full in out:
        full = re.sub(r"cute::C<(-?\d+)>", r"\1", full)
        full = re.sub(r"\b(gr_kernels|cute|cutlass)::", "", full)
        short.append(full if len(full) <= 160 else full[:157] + "...")
    return short


def parse(report: str, source: str, listing: str = "") -> list[dict]:
    """One row per kernel entry: registers, stack, spill bytes and the WGMMA serialisation notes naming it; with a
    disassembly ``listing`` (``--sass``) also its ``sass_counts``."""
    rows: list[dict] = []
    notes: dict[str, list[str]] = {}
    current: dict | None = None
    for line in report.splitlines():
        if _WGMMA.search(line):
            named = _QUOTED.search(line)
            text = _QUOTED.sub("", line.split(":", 1)[-1]).strip()
            notes.setdefault(named[1] if named else "", []).append(text)
        if m := _ENTRY.search(line):
            current = {"source": source, "kernel": m["name"], "arch": m["arch"]}
            rows.append(current)
        elif current is not None and (m := _FRAME.search(line)):
            current.update(stack=int(m["stack"]), spill_stores=int(m["stores"]), spill_loads=int(m["loads"]))
        elif current is not None and (m := _USED.search(line)):
            current["registers"] = int(m["regs"])
    sass = sass_counts(listing) if listing else {}
    for row in rows:
        row["wgmma_warnings"] = notes.get(row["kernel"], []) + notes.get("", [])
        if row["kernel"] in sass:  # a kernel the listing lacks shows "?", not zero counts
            row.update(sass[row["kernel"]])
    for row, name in zip(rows, demangle([r["kernel"] for r in rows]), strict=True):
        row["kernel"] = name
    return rows


def table(rows: list[dict]) -> str:
    sass = any("gmma" in r for r in rows)
    head = "| source | kernel | registers | stack B | spill stores B | spill loads B | WGMMA warnings |"
    rule = "|---|---|---|---|---|---|---|"
    if sass:
        head += " HGMMA | GMMA waits | STL | LDL |"
        rule += "---|---|---|---|"
    lines = [head, rule]
    for r in rows:
        warn = "; ".join(sorted(set(r["wgmma_warnings"])))[:200] or "-"
        line = (
            f"| {Path(r['source']).name} | `{r['kernel']}` | {r.get('registers', '?')} | {r.get('stack', '?')} | "
            f"{r.get('spill_stores', '?')} | {r.get('spill_loads', '?')} | {warn} |"
        )
        if sass:
            line += " " + " | ".join(str(r.get(k, "?")) for k in SASS_COUNTS) + " |"
        lines.append(line)
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sources", nargs="*", default=list(DEFAULT_SOURCES), help="paths under packages/gr-kernels")
    ap.add_argument("--arch", default="90a")
    ap.add_argument("-D", dest="defines", action="append", default=[], help="NAME=VALUE passed to nvcc")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--sass", action="store_true", help="also count GMMAs, their waits and local memory (nvdisasm)")
    args = ap.parse_args()
    for s in args.sources:
        if not (PACKAGE / s).is_file():
            ap.error(f"no source {s} under {PACKAGE}")
    t = time.perf_counter()
    if args.sass:
        nvdisasm()  # fail before compiling when it is missing
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        reports = list(pool.map(lambda s: compile_source(s, args.arch, args.defines, args.sass), args.sources))
    rows = [row for s, (rep, sass) in zip(args.sources, reports, strict=True) for row in parse(rep, s, sass)]
    print(table(rows))
    print(f"\n{len(rows)} kernels from {len(args.sources)} sources, sm_{args.arch}, {time.perf_counter() - t:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    spilled = [r for r in rows if r.get("spill_stores", 0) or r.get("spill_loads", 0) or r["wgmma_warnings"]]
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
