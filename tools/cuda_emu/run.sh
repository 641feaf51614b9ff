#!/usr/bin/env bash
# Run the CUDA kernels' GPU tests (tests/influence/ops/test_cuda.py) on the CPU: the real csrc/cuda/*.cu sources
# are compiled as C++ against a small emulation of the CUDA subset they use (include/cuda_runtime.h:
# blocks run one after another, a block's threads are ucontext fibers switched at every __syncthreads
# and warp shuffle, in a configurable order). It checks the kernels' logic (indexing, tiling, masks,
# fixed-order reductions, barriers) where no GPU exists; it cannot show real races, warp timing, or
# speed. EMU_ORDER=0|1|2 picks the thread order, EMU_SMS the reported SM count.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PYTHON="${PYTHON:-python}"
BUILD="${IPPO_EMU_BUILD:-$ROOT/build/cuda_emu}"
mkdir -p "$BUILD/src"
KERNELS=(exact_score projected_score segment_sketch select kernels_bind)
for f in "${KERNELS[@]}"; do
  # kernel<<<grid, block, smem, stream>>>(args) -> emu_launch(kernel, grid, block, smem, stream, args)
  "$PYTHON" - "$ROOT/csrc/cuda/$f.cu" "$BUILD/src/$f.cpp" <<'PY'
import re, sys
s = open(sys.argv[1]).read()
s = re.sub(r"([\w:]+(?:<[^<>;()]*>)?)<<<(.*?)>>>\(", r"emu_launch(\1, \2, ", s, flags=re.S)
open(sys.argv[2], "w").write(s)
PY
done
EXT=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
# shellcheck disable=SC2046
g++ -std=c++20 -O1 -fPIC -shared -D__CUDACC__ -I"$ROOT/tools/cuda_emu/include" -I"$ROOT/csrc" \
  $("$PYTHON" -m pybind11 --includes) "$BUILD"/src/*.cpp "$ROOT/tools/cuda_emu/emu_module.cpp" -o "$BUILD/ippo_emu$EXT"
cd "$ROOT"
PYTHONPATH="$BUILD:$ROOT/tools/cuda_emu${PYTHONPATH:+:$PYTHONPATH}" \
  "$PYTHON" -m pytest -q -p emu_plugin tests/influence/ops/test_cuda.py -k "not cpu_tensors_are_rejected" "$@"
