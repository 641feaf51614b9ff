#!/usr/bin/env bash
# See dependency drift before users do: install the NEWEST releases that ippo's ranges allow
# (requirements-dev.txt / pyproject.toml, *without* constraints.txt) into a temporary venv, print what
# differs from the tested pins, and run a fast subset of the tests from the repository root:
#   1. collection of every test module      (an import-time break anywhere, e.g. a shadowed package)
#   2. the packaging tests                  (no repository name shadows a dependency)
#   3. the engine tests                     (the influence engine against per-episode autograd)
#   4. a 2-iteration I-PPO smoke run         (python -m ippo.cli, i.e. with the repo root on sys.path)
#   5. a 2-process FSDP smoke run           (torchrun -m ippo.cli from the repo root, gloo)
# Exit code 0 when all pass; the summary names each step that failed. Nothing in the working tree
# changes: the tracked files are copied to a temporary folder, which holds the venv, the build and the
# runs, and is removed at the end unless KEEP=1. The extension is built CPU-only there (IPPO_CUDA=0:
# the CUDA sources do not depend on Python packages; CI compiles them).
#
#   bash scripts/check_latest_deps.sh                 # torch stays at the tested pin (see below)
#   LATEST_TORCH=1 bash scripts/check_latest_deps.sh  # also the newest torch (a CUDA build: several GB)
#
# torch is held at the tested version by default: an open torch range resolves to a multi-GB CUDA build
# on a CPU-only machine (README, "Installing"); move it deliberately, with LATEST_TORCH=1 on a machine
# that can take it.
set -uo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 IPPO_CUDA=0
TMP=$(mktemp -d "${TMPDIR:-/tmp}/ippo-latest-XXXXXX")
VENV="$TMP/venv"
LOG="$TMP/log"
mkdir -p "$LOG" "$TMP/src"
cleanup() { if [ "${KEEP:-0}" = "1" ]; then echo "kept: $TMP"; else rm -rf "$TMP"; fi; }
trap cleanup EXIT
# a copy of the tracked files (committed or not): the editable build writes into its source tree
git ls-files -z --cached --others --exclude-standard | xargs -0 tar --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$TMP/src"
cd "$TMP/src"
ROOT=$(pwd)

python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"

TORCH_PIN=$(grep -E '^torch==' constraints.txt | sed 's/[[:space:]]*#.*//')
if [ "${LATEST_TORCH:-0}" = "1" ]; then
    HOLD=()
    echo "== install: newest releases the ranges allow (torch included)"
else
    printf '%s\n' "$TORCH_PIN" > "$TMP/hold.txt"
    HOLD=(-c "$TMP/hold.txt")
    echo "== install: newest releases the ranges allow (torch held at ${TORCH_PIN#torch==})"
fi
if ! pip install -q --upgrade "${HOLD[@]}" -r requirements-dev.txt > "$LOG/install.txt" 2>&1; then
    tail -30 "$LOG/install.txt"
    echo "check_latest_deps: FAILED to install the newest allowed releases (log above)"
    exit 1
fi
if ! pip install -q --no-build-isolation -e . > "$LOG/build.txt" 2>&1; then
    tail -30 "$LOG/build.txt"
    echo "check_latest_deps: FAILED to build ippo against the newest allowed releases"
    exit 1
fi

echo "== versions that differ from constraints.txt (tested -> newest allowed)"
pip freeze --all --exclude-editable 2>/dev/null | grep -v '^#' | sort -f > "$TMP/latest.txt"
python3 - "$ROOT/constraints.txt" "$TMP/latest.txt" <<'EOF'
import re, sys
def read(path):
    out = {}
    for line in open(path):
        line = line.split("#")[0].strip()
        if "==" in line:
            name, ver = line.split("==", 1)
            out[re.sub(r"[-_.]+", "-", name).lower()] = ver.strip()
    return out
pinned, latest = read(sys.argv[1]), read(sys.argv[2])
changed = [(n, pinned.get(n, "-"), v) for n, v in sorted(latest.items())
           if pinned.get(n, "").split("+")[0] != v.split("+")[0] and n != "pip"]
for n, old, new in changed:
    print(f"  {n:28s} {old:>14s} -> {new}")
print(f"  ({len(changed)} of {len(latest)} differ)" if changed else "  none: the pins are the newest allowed")
EOF

export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
FAILED=()
step() {  # step NAME COMMAND...: run it, keep the log, print one line
    local name=$1; shift
    local t0=$SECONDS
    if "$@" > "$LOG/$name.txt" 2>&1; then
        echo "  ok      $name ($((SECONDS - t0)) s)"
    else
        echo "  FAILED  $name ($((SECONDS - t0)) s): last lines of its log:"
        tail -15 "$LOG/$name.txt" | sed 's/^/            /'
        FAILED+=("$name")
    fi
}
echo "== fast subset, from the repository root"
step collect python -m pytest -q --collect-only -p no:cacheprovider tests
step packaging python -m pytest -q -p no:cacheprovider tests/test_packaging.py
step engine python -m pytest -q -p no:cacheprovider tests/influence/test_engine.py
step smoke python -m ippo.cli train configs/smoke_cpu.yaml iterations=2 "run_dir=$TMP/runs/smoke"
step fsdp torchrun --standalone --nproc_per_node 2 -m ippo.cli train configs/smoke_cpu.yaml \
    dist.strategy=fsdp iterations=2 "run_dir=$TMP/runs/fsdp"

if [ ${#FAILED[@]} -eq 0 ]; then
    echo "check_latest_deps: all passed with the newest allowed releases"
    exit 0
fi
echo "check_latest_deps: ${#FAILED[@]} step(s) failed with the newest allowed releases: ${FAILED[*]}"
exit 1
