#!/usr/bin/env bash
# Everything issue 4 needs from one GPU, in one call of at most ~9.5 minutes, results in $OUT.
#
#   OUT=/path/that/comes/back bash scripts/gpu_session.sh
#
# 1. set-up: wheels carried in .whl/ (if any) into /tmp/site; the repo importable with kernels/
#    as edgepaged.kernels (editable install, or a symlink in this disposable copy if pip cannot);
# 2. in parallel: the kernel tests (two halves), the CUDA-graph + triton-engine + GPU parity
#    tests, and writing the benchmark's random checkpoints (CPU work);
# 3. scripts/check_kernels_gpu.py (kernel timings); 4. scripts/bench_gpu.py with the time left.
# Every step has a hard limit. $OUT receives five files (the device tool returns at most eight):
# session.log (summary), steps.log (every step's output), the kernel timings JSON and the
# benchmark's .md and .json, which are also left in docs/benchmarks/ of this copy.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
: "${OUT:?set OUT to the folder whose files come back}"
PY="${PYTHON:-python3}"
TOTAL_S="${GPU_SESSION_SECONDS:-560}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
LOGS="$(mktemp -d)"
MODELS=/tmp/edgepaged-bench-models
SUMMARY="$OUT/session.log"
START=$SECONDS

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((TOTAL_S - (SECONDS - START))); }

finish() {
    for f in "$LOGS"/*.log; do
        [ -e "$f" ] && { echo "===== $(basename "$f")"; cat "$f"; } >>"$OUT/steps.log"
    done
    find docs/benchmarks -newer "$LOGS" \( -name 'gpu-*' -o -name 'kernels-*' \) -exec cp {} "$OUT"/ \;
    say "== done after $((SECONDS - START)) s; files: $(cd "$OUT" && ls | tr '\n' ' ')"
}
trap finish EXIT

# run NAME LIMIT_S CMD...: one step under a hard limit (capped by the session's time left)
run() {
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    local avail=$(($(left) - 20))
    ((limit > avail)) && limit=$avail
    if ((limit < 15)); then
        say "== $name: skipped, the session's time is used up"
        return 1
    fi
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    say "== $name: exit $rc in $((SECONDS - t0)) s (limit $limit s)$( ((rc == 124)) && echo ', TIMED OUT')"
    return $rc
}

say "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"

# -- 1. set-up -------------------------------------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" && say "== installed $(ls .whl | tr '\n' ' ')"
fi
if "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$LOGS/00-install.log" 2>&1; then
    say "== edgepaged installed in editable mode"
else
    ln -sfn ../kernels edgepaged/kernels  # this copy only: makes kernels/ importable as edgepaged.kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    say "== editable install failed (see steps.log); using the repo on PYTHONPATH with an edgepaged/kernels link"
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import importlib.util, sys
need = ["torch", "triton", "transformers", "numpy", "pydantic", "yaml", "psutil", "safetensors", "pytest"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
print("== python", sys.version.split()[0], "; missing modules:", ", ".join(missing) or "none")
import torch, triton, transformers
print("== torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
import edgepaged.kernels, edgepaged.engine  # fails loudly here if the package cannot import
print("== edgepaged imports from", edgepaged.kernels.__file__)
EOF
if ! "$PY" -c "import edgepaged.engine, edgepaged.kernels" 2>/dev/null; then
    say "== edgepaged does not import: carry the missing wheels in .whl/ (see above); stopping"
    exit 1
fi

# -- 2. tests and checkpoints, in parallel --------------------------------------------------------
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfE)
run 10-test-kernels-decode 300 "${PYTEST[@]}" tests/test_kernels_gpu.py -k "decode" &
run 11-test-kernels-rest 300 "${PYTEST[@]}" tests/test_kernels_gpu.py -k "not decode" &
run 12-test-graphs-engine 300 "${PYTEST[@]}" -m gpu tests/test_cuda_graph_gpu.py tests/test_triton_engine.py \
    tests/test_gpu_parity.py &
run 13-bench-checkpoints 300 "$PY" scripts/bench_gpu.py --prepare-only --models-dir "$MODELS" &
wait
grep -h -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$LOGS"/1[012]-*.log | sed 's/^/   /' | tee -a "$SUMMARY"

# -- 3. kernel timings ---------------------------------------------------------------------------
CARD=$("$PY" -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
run 20-check-kernels 90 "$PY" scripts/check_kernels_gpu.py --skip-tests \
    --out "docs/benchmarks/kernels-$CARD-$(date -u +%F).json"

# -- 4. the benchmark, with what is left (it stops starting parts 30 s before its budget ends) ---
BUDGET=$(($(left) - 60))
run 30-bench 600 "$PY" scripts/bench_gpu.py --models-dir "$MODELS" --budget-s "$BUDGET"
grep -E "^  (MET|MISS|n/a)" "$LOGS/30-bench.log" | tee -a "$SUMMARY"
