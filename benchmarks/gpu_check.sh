#!/usr/bin/env bash
# GPU check for an H100/H200 machine, sized to one device call (<= 600 s): build ippo._C with CUDA,
# run the test suite on the GPU, then the kernel, scoring and step benchmarks at GPU sizes, in order
# of value, each under a timeout taken from one budget (GPU_CHECK_BUDGET_S, default 540 s), so that a
# slow step cannot eat the lease. Everything lands under ${OUT:-benchmarks/results/gpu}:
# <step>.log per step, the benchmarks' JSON and plots, nvidia-smi.txt, torch.txt, backends.json.
#   bash benchmarks/gpu_check.sh                              # on the GPU machine, from anywhere
#   GPU_CHECK_CPU=1 OUT=/tmp/gc bash benchmarks/gpu_check.sh  # the same steps at smoke sizes on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-540}"
START=$SECONDS
status=0

if [ "${GPU_CHECK_CPU:-0}" = "1" ]; then  # rehearsal: the same steps, CPU and smoke sizes
    DEV=(--device cpu --smoke); TESTS=(tests/test_benchmarks.py); BUILD_ENV=(IPPO_CUDA=0)
else
    DEV=(--device cuda); TESTS=(tests); BUILD_ENV=(IPPO_CUDA_ARCHS=90)
fi

step() {  # step NAME CAP_S CMD...: run under min(CAP_S, budget left), tee the log, keep going on failure
    local name="$1" cap="$2"; shift 2
    local left=$((BUDGET - (SECONDS - START)))
    local limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt 20 ]; then echo "== $name: SKIPPED (budget spent)"; status=1; return; fi
    echo "== $name (<= ${limit} s): $*"
    if timeout "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1; then echo "== $name: ok ($((SECONDS - START)) s in all)"
    else echo "== $name: FAILED or timed out ($((SECONDS - START)) s in all)"; status=1; fi
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())" \
    | tee "$OUT/torch.txt"

step build 180 env "${BUILD_ENV[@]}" "$PY" -m pip install --no-build-isolation --no-deps -e .
"$PY" -c "import ippo, json; print(json.dumps({k: [v.available, v.reason] for k, v in ippo.backends().items()}, indent=1))" \
    | tee "$OUT/backends.json"
# correctness first: the whole suite (the GPU tests included), in parallel when pytest-xdist is there
XDIST=(); "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
step tests 200 "$PY" -m pytest -q "${XDIST[@]}" "${TESTS[@]}"
step bench_kernels 90 "$PY" benchmarks/bench_kernels.py "${DEV[@]}" --out "$OUT"
# the tiny model's E sweep up to E=256 and T up to 512 (the >= 10x target), every method and backend
step bench_scoring 150 "$PY" benchmarks/bench_scoring.py "${DEV[@]}" --presets tiny --out "$OUT"
# PPO vs I-PPO on the base config (512 wide, 8 layers, E=64, T=128) and the first E variant (<= 1.10x)
step bench_step 150 "$PY" benchmarks/bench_step.py "${DEV[@]}" --max-configs 2 --out "$OUT"
# what is left of the budget: the larger presets (125m, 1b)
step bench_scoring_sizes 240 "$PY" benchmarks/bench_scoring.py "${DEV[@]}" --presets 125m,1b --no-memory --out "$OUT/sizes"

echo "== $((SECONDS - START)) s; results in $OUT"; ls -l "$OUT"
exit $status
