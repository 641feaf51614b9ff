#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with nvcc into object files for sm_80 and sm_90 (CI check; no GPU needed).
#
#   scripts/check_cuda_compile.sh              # archs from IPPO_CUDA_ARCHS (default "80;90")
#   NVCC=/path/to/nvcc PYTHON=python3 scripts/check_cuda_compile.sh
#
# Exits non-zero when nvcc is missing or any file fails to compile; prints what it compiled.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || true)}"
PYTHON="${PYTHON:-python3}"
ARCHS="${IPPO_CUDA_ARCHS:-80;90}"

if [[ -z "${NVCC}" ]]; then
  echo "check_cuda_compile: nvcc not found (set NVCC or put it on the PATH)" >&2
  exit 2
fi

# pybind11 + Python headers: the binding file (cuda_ops.cu) includes pybind11.
if ! PY_INCLUDES="$("${PYTHON}" -m pybind11 --includes 2>/dev/null)"; then
  echo "check_cuda_compile: '${PYTHON} -m pybind11 --includes' failed (pip install pybind11)" >&2
  exit 2
fi

GENCODE=()
IFS=';, ' read -r -a ARCH_LIST <<< "${ARCHS}"
for a in "${ARCH_LIST[@]}"; do
  [[ -z "$a" ]] && continue
  GENCODE+=("-gencode=arch=compute_${a},code=sm_${a}")
done

OUT="$(mktemp -d)"
trap 'rm -rf "${OUT}"' EXIT

shopt -s nullglob
SOURCES=("${ROOT}"/csrc/cuda/*.cu)
if [[ ${#SOURCES[@]} -eq 0 ]]; then
  echo "check_cuda_compile: no csrc/cuda/*.cu files" >&2
  exit 1
fi

echo "nvcc: $("${NVCC}" --version | tail -n 1)"
echo "archs: ${ARCHS}"
failed=0
for src in "${SOURCES[@]}"; do
  rel="${src#"${ROOT}"/}"
  obj="${OUT}/$(basename "${src}" .cu).o"
  # shellcheck disable=SC2086
  if "${NVCC}" -std=c++17 -O3 -Xcompiler=-fPIC --expt-relaxed-constexpr -DIPPO_WITH_CUDA \
      "${GENCODE[@]}" -I"${ROOT}/csrc" ${PY_INCLUDES} -c "${src}" -o "${obj}"; then
    echo "OK    ${rel} -> $(basename "${obj}") ($(stat -c %s "${obj}") bytes)"
  else
    echo "FAIL  ${rel}" >&2
    failed=$((failed + 1))
  fi
done

if [[ ${failed} -ne 0 ]]; then
  echo "check_cuda_compile: ${failed} file(s) failed" >&2
  exit 1
fi
echo "check_cuda_compile: all ${#SOURCES[@]} file(s) compiled for ${ARCHS}"
