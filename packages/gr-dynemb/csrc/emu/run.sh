#!/usr/bin/env bash
# Checks the CUDA table's kernel logic without a GPU: cuda_table.cu is compiled as C++ against a host emulation of
# the CUDA features it uses (include/: every CUDA thread a std::thread, tiles/warps/blocks synchronised by
# std::barrier) and run against the CPU table in emu_check.cpp (ops, policies, duplicates, eviction, growth, the
# host tier, initializers). It checks logic only: not GPU memory ordering, not speed. A few minutes on 2 cores.
#   bash packages/gr-dynemb/csrc/emu/run.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
csrc="$(dirname "$here")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# kernel<<<grid, block, smem, stream>>>(args)  ->  emu::launch(&kernel, emu::cfg(grid, block, smem, stream))(args)
python3 - "$csrc/table/cuda_table.cu" "$work/cuda_table_emu.cpp" <<'PY'
import re, sys
src = open(sys.argv[1]).read()
out, n = re.subn(r"(\w+(?:<[^<>()]*>)?)\s*<<<(.*?)>>>\(", r"emu::launch(&\1, emu::cfg(\2))(", src, flags=re.S)
assert n > 0, "no kernel launches found"
open(sys.argv[2], "w").write(out)
PY
g++ -std=c++20 -O1 -ffp-contract=off -pthread -I"$here/include" -I"$csrc" -include "$here/include/emu.h" \
    "$work/cuda_table_emu.cpp" "$csrc/table/cpu_table.cpp" "$here/emu_check.cpp" -o "$work/emu_check"
"$work/emu_check"
