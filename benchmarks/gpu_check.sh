#!/usr/bin/env bash
# GPU check for an H100/H200 machine: build ippo._C with CUDA, run the whole test suite on the GPU,
# then the kernel, scoring and step benchmarks at their full (non --quick) GPU sizes.
# Everything lands under ${OUT:-benchmarks/results/gpu}. Run from anywhere:
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
status=0

step() {  # step NAME CMD...: run, tee the log, remember a failure but keep going
    local name="$1"; shift
    echo "== $name: $*"
    if "$@" > >(tee "$OUT/$name.log") 2>&1; then echo "== $name: ok"; else echo "== $name: FAILED"; status=1; fi
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee "$OUT/torch.txt"

step build env IPPO_CUDA_ARCHS=90 "$PY" -m pip install --no-build-isolation --no-deps -e .
"$PY" -c "import ippo, json; print(json.dumps({k: [v.available, v.reason] for k, v in ippo.backends().items()}, indent=1))" \
    | tee "$OUT/backends.json"
step tests "$PY" -m pytest -q tests
step bench_kernels "$PY" benchmarks/bench_kernels.py --device cuda --out "$OUT"
step bench_scoring "$PY" benchmarks/bench_scoring.py --device cuda --out "$OUT"
step bench_step "$PY" benchmarks/bench_step.py --device cuda --out "$OUT"   # PPO vs I-PPO iteration (<= 1.10x target)

echo "== results in $OUT"; ls -l "$OUT"
exit $status
