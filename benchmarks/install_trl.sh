#!/usr/bin/env bash
# Install the TRL versions that `benchmarks/bench_trl.py` (and `bench_step.py --vs-trl`) compare against:
#   * trl==1.16.0 into the current Python environment (GRPOTrainer; pulls datasets, accelerate, ...);
#   * trl==1.12.0 with --no-deps into its own folder (PPOTrainer, removed in 1.13), put first on
#     PYTHONPATH only in the PPO subprocess so that it shadows 1.16 there and nowhere else.
# torch stays pinned through constraints.txt (an open torch range resolves to a multi-GB CUDA build).
# Usage: bash benchmarks/install_trl.sh            (PYTHON=/path/to/python, TRL_112_DIR=dir to override)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
DIR="${TRL_112_DIR:-$ROOT/benchmarks/.trl-1.12}"
# requests' own dependencies too: the README's `pip install --no-deps ... requests` (SmolLM2) leaves them out,
# and trl imports requests (through its vLLM client) even when vLLM is not used.
"$PY" -m pip install -c "$ROOT/constraints.txt" "trl==1.16.0" requests urllib3 idna charset-normalizer certifi
"$PY" -m pip install --no-deps --upgrade --target "$DIR" "trl==1.12.0"
"$PY" - "$DIR" <<'PY'
import subprocess, sys
import trl
print(f"trl {trl.__version__} in the environment")
out = subprocess.run([sys.executable, "-c", "import trl; print(trl.__version__, trl.__file__)"],
                     env={"PYTHONPATH": sys.argv[1], "PATH": ""}, capture_output=True, text=True, check=True)
print(f"trl {out.stdout.strip()} (PYTHONPATH={sys.argv[1]})")
PY
