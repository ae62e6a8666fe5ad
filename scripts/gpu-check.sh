#!/usr/bin/env bash
# GPU smoke checks of opdkit (docs: README "Development"; the checks: opdkit/gpucheck.py).
#   scripts/gpu-check.sh [--cpu] [OUT.json] [--only NAME ...]
# Builds every model in-process and fetches nothing; <= 8 minutes on one H200. --cpu is the dry mode the
# test suite runs: the same checks on the CPU at small sizes. Exit status 0 iff every check passed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY="$(command -v python3 || command -v python)"; fi
fi
args=()
out=""
for a in "$@"; do
  case "$a" in
    --cpu|--only) args+=("$a") ;;
    *.json) out="$a" ;;
    *) args+=("$a") ;;
  esac
done
out="${out:-${OUT:-.}/gpu-check.json}"
# CUBLAS_WORKSPACE_CONFIG: deterministic cuBLAS for the exact-resume check; it must be set before CUDA starts.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
exec "$PY" -m opdkit.gpucheck --out "$out" ${args[@]+"${args[@]}"}
