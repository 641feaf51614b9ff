#!/usr/bin/env bash
# GPU check for an H100/H200 machine, sized to one device call (<= 600 s): build ippo._C with CUDA,
# run the test suite on the GPU, then the kernel, scoring and step benchmarks at GPU sizes, in order
# of value, each under a timeout taken from one budget (GPU_CHECK_BUDGET_S, default 540 s), so that a
# slow step cannot eat the lease. Everything lands under ${OUT:-benchmarks/results/gpu}:
# <step>.log per step, the benchmarks' JSON and plots, nvidia-smi.txt, torch.txt, backends.json.
#   bash benchmarks/gpu_check.sh                              # on the GPU machine, from anywhere
#   GPU_CHECK_CPU=1 OUT=/tmp/gc bash benchmarks/gpu_check.sh  # the same steps at smoke sizes on a CPU
#
# vLLM (rollout.engine=vllm) steps: bench_rollout (tokens/s of vLLM vs HF generate on the same prompts) and
# one short I-PPO iteration of configs/gsm8k_qwen0.5b_ippo.yaml on a random-weight model of its shape. They
# need `import vllm` to work on the GPU machine: vLLM 0.32.0 with the CUDA build of torch 2.13.0 (see
# pyproject's [vllm] extra). A lent machine reaches no registry, so these would have to travel as wheels
# (`pip download vllm==0.32.0 torch==2.13.0 ... -d wheels/` on a machine with the same Python and CUDA, then
# `pip install --no-index --find-links wheels/ -e .[vllm]` there) -- vllm alone is a 327 MB wheel, more than
# one call carries today. Without vllm the vLLM row is skipped with that note, and the iteration runs
# with rollout.engine=hf, so the config is still checked end to end on the GPU.
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
    RANDOM_MODEL=(--preset tiny-qwen --dtype float32); ITER_DEV=(device=cpu model.dtype=float32 threads=2 rollout.max_new_tokens=16)
else
    DEV=(--device cuda); TESTS=(tests); BUILD_ENV=(IPPO_CUDA_ARCHS=90)
    RANDOM_MODEL=(--preset qwen2.5-0.5b --dtype bfloat16); ITER_DEV=()
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
"$PY" -c "import ippo, json; print(json.dumps({k: [v.available, v.reason] for k, v in ippo.influence.backends().items()}, indent=1))" \
    | tee "$OUT/backends.json"
# correctness first: the whole suite (the GPU tests included), in parallel when pytest-xdist is there
XDIST=(); "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
step tests 200 "$PY" -m pytest -q "${XDIST[@]}" "${TESTS[@]}"
step bench_kernels 90 "$PY" benchmarks/bench_kernels.py "${DEV[@]}" --out "$OUT"
# the tiny model's E sweep up to E=256 and T up to 512 (the >= 10x target), every method and backend
step bench_scoring 150 "$PY" benchmarks/bench_scoring.py "${DEV[@]}" --presets tiny --out "$OUT"
# PPO vs I-PPO on the base config (512 wide, 8 layers, E=64, T=128) and the first E variant (<= 1.10x)
step bench_step 150 "$PY" benchmarks/bench_step.py "${DEV[@]}" --max-configs 2 --out "$OUT"
# rollout tokens/s: vLLM against HF generate, same prompts, seeds and budget (random Qwen2.5-0.5B shape)
step bench_rollout 150 "$PY" benchmarks/bench_rollout.py "${DEV[@]}" --out "$OUT"
# one short I-PPO iteration of the 0.5B config, end to end (random weights of Qwen2.5-0.5B's shape: no hub)
SCRATCH="$(mktemp -d)"  # the model and the run's checkpoint stay out of $OUT (GBs)
ENGINE=vllm
if [ "${GPU_CHECK_CPU:-0}" = "1" ] || ! "$PY" -c "import vllm" >/dev/null 2>&1; then
    ENGINE=hf; echo "== note: vllm is not importable here (or CPU rehearsal): the 0.5B iteration runs rollout.engine=hf"
fi
step random_qwen0.5b 90 "$PY" scripts/write_random_model.py "$SCRATCH/model" "${RANDOM_MODEL[@]}"
step "ippo_qwen0.5b_$ENGINE" 200 "$PY" -m ippo.cli train configs/gsm8k_qwen0.5b_ippo.yaml \
    model.path="$SCRATCH/model" run_dir="$SCRATCH/run" iterations=1 rollout.engine="$ENGINE" \
    data.train_path=tests/rl/data/arith_train.jsonl data.test_path= data.val_holdout=8 influence.n_val=8 \
    rollout.prompts_per_iter=8 rollout.samples_per_prompt=4 rollout.max_new_tokens=128 ppo.mini_batch_size=32 \
    influence.filter=bottom_fraction influence.fraction=0 influence.reweight=false eval.every=0 \
    log.tensorboard=false log.progress=false "${ITER_DEV[@]}"
cp "$SCRATCH/run/metrics.jsonl" "$OUT/ippo_qwen0.5b_${ENGINE}_metrics.jsonl" 2>/dev/null || true
rm -rf "$SCRATCH"
# what is left of the budget: the larger presets (125m, 1b)
step bench_scoring_sizes 240 "$PY" benchmarks/bench_scoring.py "${DEV[@]}" --presets 125m,1b --no-memory --out "$OUT/sizes"

echo "== $((SECONDS - START)) s; results in $OUT"; ls -l "$OUT"
exit $status
