#!/usr/bin/env bash
# GPU smoke checks of opdkit (docs: README "Development"; the checks: opdkit/gpucheck.py).
#   scripts/gpu-check.sh [--cpu] [OUT.json] [--only NAME ...]
# Builds every model in-process and fetches nothing; <= 8 minutes on one H200. --cpu is the dry mode the
# test suite runs: the same checks on the CPU at small sizes. Exit status 0 iff every check passed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
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
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" -m opdkit.gpucheck --out "$out" "${args[@]}"
