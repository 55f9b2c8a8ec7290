#!/usr/bin/env bash
# What issues 3 to 7 need from one GPU, one stage per call of at most ~9.5 minutes, results in $OUT.
#
#   OUT=/path/that/comes/back bash scripts/gpu_session.sh [tests|steploop|kernels|serving|recheck|overlap|llama1b|rag|quant]
#
# The stage "quant" is issue 13's run: tests/test_quant_gpu.py (random GGUF models in Q4_0, Q4_1,
# Q8_0 and the Q4_K_M mix through both backends, against their dequantisation), the kernel tests
# tests/test_quant_kernels_gpu.py, then bench_gpu.py's part 5 (batch-1 decode of the 1B shape in
# bf16, Q8_0 and Q4_0; its GGUFs are written while the tests run); $OUT receives session.log,
# steps.log, quant-tests.log and the report gpu-<card>-<date>-quant.md and .json:
#   device call: OUT=$OUT bash scripts/gpu_session.sh quant     with carry [".whl", ".carry"]
#
# The stage "tests" is the run every change to kernels/, cuda_graph.py, model_runner.py,
# overlap.py, engine.py or scheduler.py goes through before it is called done: every test
# marked gpu, the overlap tests (on CUDA as well as the CPU) and every kernel test, with the
# tokenizer from .carry/smollm2-tokenizer (no test needs the default model); session.log ends
# with pytest's summary line, which must say 0 failed and no errors. The stage "steploop" runs
# the same tests while llama.cpp builds in the background (from .peers/, see shared/peers), then
# scripts/bench_step_loop.py with llama-batched-bench beside it:
#   device call: OUT=$OUT bash scripts/gpu_session.sh steploop     with carry [".whl", ".carry", ".peers"]
#
# The stage "kernels" (default) is issue 4's run, below. The stage "serving" runs what issues 3, 5
# and 6 need from a GPU: the probe's GPU test, the TensorRT-style AOT kernel launch check, the
# memory burst under three profiles and the serving benchmark, on a random-weight SmolLM2-shaped
# model that uses the real tokenizer carried in .carry/smollm2-tokenizer (the default model's
# 98 MB GGUF is larger than a call may carry). The stage "recheck" reruns the fused-kernel and
# parity tests, the memory burst and the benchmark. The stages "overlap" and "llama1b" rerun issue
# 4's GPU tests and its benchmark (SmolLM2, then Llama-3.2-1B, one call each, reports tagged by
# model) with overlapped steps, comparing KV block sizes 8 and 16. The stage "rag" runs issue 7's RAG benchmark
# (scripts/bench_rag.py: canonical vs score-ordered layout vs no prefix cache, 200 questions,
# 32 output tokens) on the same random-weight model, with the fp16 copy of the embedding model
# carried in .carry/minilm-fp16 (the packaged 90 MB original does not fit either), in about 4 min;
# $OUT then receives session.log, steps.log and the benchmark's rag-<card>-<date>.md and .json:
#   device call: OUT=$OUT bash scripts/gpu_session.sh rag     with carry [".whl", ".carry"]
#
# Before the call, here (both folders are git-ignored through .git/info/exclude):
#   mkdir -p .carry/smollm2-tokenizer && cp ~/.cache/edgepaged/models/SmolLM2-135M-Instruct-*/{tokenizer.json,\
#       tokenizer_config.json,chat_template.jinja,generation_config.json} .carry/smollm2-tokenizer/
#   python3 scripts/write_embedding_copy.py .carry/minilm-fp16     # 44 MiB; stage "rag" only
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform any -d .whl pydantic==2.13.4 pydantic_core==2.46.4 \
#       annotated-types==0.7.0 typing-inspection==0.4.2 typing_extensions==4.16.0 pytest==9.0.3 pluggy==1.6.0 \
#       iniconfig==2.3.0 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 h11==0.16.0 anyio==4.16.0 \
#       annotated-doc==0.0.7 opentelemetry-api==1.45.2 prometheus-client==0.26.0 httpx==0.28.1 httpcore==1.0.9
# and run the device call with carry [".whl", ".carry"] (about 52 MiB with the embedding copy, of
# the 64 MiB a call may carry with the tree; leave .carry/minilm-fp16 out of .carry for other stages
# if space runs short).
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
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
STAGE="${1:-kernels}"
TOTAL_S="${GPU_SESSION_SECONDS:-560}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
LOGS="$(mktemp -d)"
STAMP="$(mktemp)"  # reports newer than this come back (the log folder's own time moves on)
MODELS=/tmp/edgepaged-bench-models
SUMMARY="$OUT/session.log"
START=$SECONDS

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((TOTAL_S - (SECONDS - START))); }

finish() {
    for f in "$LOGS"/*.log; do
        [ -e "$f" ] && { echo "===== $(basename "$f")"; cat "$f"; } >>"$OUT/steps.log"
    done
    find docs/benchmarks -newer "$STAMP" \( -name 'gpu-*' -o -name 'kernels-*' -o -name 'memory-*' -o -name 'serve-*' \
        -o -name 'tensorrt-*' -o -name 'rag-*' -o -name 'steploop-*' -o -name 'quant-*' \) -exec cp {} "$OUT"/ \;
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

CARD=$("$PY" -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
if [ "$STAGE" = tests ] || [ "$STAGE" = steploop ]; then
    if [ "$STAGE" = steploop ] && [ -f .peers/build_llamacpp.sh ]; then
        # Detaches: builds while the tests run, and at the lowest priority, so that a benchmark
        # starting before it ends keeps its host thread (a 16-core compile beside the engine made
        # the first shape's host times of 2026-12-02's second run unreliable).
        nice -n 19 bash .peers/build_llamacpp.sh | tee -a "$SUMMARY"
    fi
    GPU_TESTS=$(grep -l "mark.gpu" tests/test_*.py | tr '\n' ' ')
    run 90-gpu-tests 420 "$PY" -m pytest -q -p no:cacheprovider -rfE -n 4 $GPU_TESTS tests/test_overlap.py tests/test_kernels.py
    tail -n 15 "$LOGS/90-gpu-tests.log" | grep -E "^(FAILED|ERROR)|passed|failed|error" | sed 's/^/   /' | tee -a "$SUMMARY"
    cp "$LOGS/90-gpu-tests.log" "$OUT/gpu-tests.log"
    [ "$STAGE" = tests ] && exit 0
    run 91-bench-steploop 600 "$PY" scripts/bench_step_loop.py --models-dir "$MODELS" \
        --llama-cpp /tmp/llamacpp/llama.cpp/build/bin --llama-cpp-wait-s 150 ${STEPLOOP_ARGS:-}
    say "== llama.cpp: $(grep BUILD_RC /tmp/llamacpp/build.log 2>/dev/null || echo 'not built')"
    grep -E "^  (pps|rag|batch1|host)|^\[|wrote|Error" "$LOGS/91-bench-steploop.log" | tail -60 | tee -a "$SUMMARY"
    # The quantized matmuls against dense bf16 on the 1B shape's layers (issue 13), if time is left.
    run 92-quant-kernels 120 "$PY" scripts/check_quant_gpu.py && grep -E "^\|" "$LOGS/92-quant-kernels.log" | head -40 | tee -a "$SUMMARY"
    exit 0
fi
if [ "$STAGE" = quant ]; then  # issue 13: quantized weights end to end, the kernels, and batch-1 decode bf16/int8/int4
    # The 1B random checkpoint and its Q8_0/Q4_0 GGUFs are CPU work: written while the tests run.
    run 95-quant-checkpoints 300 "$PY" scripts/bench_gpu.py --prepare-only --parts quant --models-dir "$MODELS" &
    run 96-test-quant-gpu 360 "$PY" -m pytest -q -p no:cacheprovider -rfE -n 4 tests/test_quant_gpu.py \
        tests/test_quant_kernels_gpu.py &
    wait
    tail -n 15 "$LOGS/96-test-quant-gpu.log" | grep -E "^(FAILED|ERROR)|passed|failed|error" | sed 's/^/   /' | tee -a "$SUMMARY"
    cp "$LOGS/96-test-quant-gpu.log" "$OUT/quant-tests.log"
    run 97-bench-quant 200 "$PY" scripts/bench_gpu.py --parts quant --models-dir "$MODELS" --budget-s 150
    grep -E "^  (bf16|int8|int4):|^  (MET|MISS|n/a)|^wrote|Error" "$LOGS/97-bench-quant.log" | tee -a "$SUMMARY"
    exit 0
fi
if [ "$STAGE" = recheck ]; then  # after fused kernels and graph memory in the plan
    RAND=/tmp/edgepaged-smollm2-random
    run 50-test-fused-graphs 200 "$PY" -m pytest -q -p no:cacheprovider -rfE -m gpu tests/test_fused_kernels.py \
        tests/test_cuda_graph_gpu.py tests/test_gpu_parity.py &
    run 51-random-model 120 "$PY" -c "
from pathlib import Path; import torch
from edgepaged.models.random_init import write_random_model
write_random_model(Path('$RAND'), 'smollm2-135m', tokenizer_from=Path('.carry/smollm2-tokenizer'), dtype=torch.bfloat16)" &
    run 52-bench-checkpoints 200 "$PY" scripts/bench_gpu.py --prepare-only --models-dir /tmp/edgepaged-bench-models &
    wait
    grep -h -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$LOGS"/50-*.log | sed 's/^/   /' | tee -a "$SUMMARY"
    run 53-bench-memory 200 "$PY" scripts/bench_memory.py --model "$RAND" --backend triton
    grep -h -E "GiB, .* concurrent" "$LOGS"/53-*.log | sed 's/^/   /' | tee -a "$SUMMARY"
    run 54-bench 600 "$PY" scripts/bench_gpu.py --models-dir /tmp/edgepaged-bench-models --budget-s $(($(left) - 40))
    grep -E "^  (MET|MISS|n/a)" "$LOGS/54-bench.log" | tee -a "$SUMMARY"
    exit 0
fi
if [ "$STAGE" = overlap ]; then  # issue 4 after overlapped steps and KV block size 8: tests, then SmolLM2
    PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfE)
    run 70-test-engine-gpu 300 "${PYTEST[@]}" tests/test_overlap.py tests/test_cuda_graph_gpu.py \
        tests/test_triton_engine.py tests/test_gpu_parity.py tests/test_fused_kernels.py &
    run 71-test-kernels-bs8 300 "${PYTEST[@]}" tests/test_kernels_gpu.py -k "bs8" &
    run 72-bench-checkpoints 200 "$PY" scripts/bench_gpu.py --prepare-only --models-dir "$MODELS" &
    wait
    grep -h -E "^(FAILED|ERROR) | in [0-9.]+s( \(.*\))?$" "$LOGS"/7[01]-*.log | sed 's/^/   /' | tee -a "$SUMMARY"
    run 73-bench 600 "$PY" scripts/bench_gpu.py --models smollm2-135m --models-dir "$MODELS" --compare-block-size 16 \
        --overlap-steps --tag smollm2 --budget-s $(($(left) - 40))
    grep -E "^  (MET|MISS|n/a)" "$LOGS/73-bench.log" | tee -a "$SUMMARY"
    exit 0
fi
if [ "$STAGE" = llama1b ]; then  # the 1B half of issue 4's benchmark (checkpoints from "overlap" if warm)
    run 80-bench-checkpoints 200 "$PY" scripts/bench_gpu.py --models llama-3.2-1b --prepare-only --models-dir "$MODELS"
    run 81-bench 600 "$PY" scripts/bench_gpu.py --models llama-3.2-1b --models-dir "$MODELS" --compare-block-size 16 \
        --overlap-steps --tag llama-3.2-1b --budget-s $(($(left) - 40))
    grep -E "^  (MET|MISS|n/a)" "$LOGS/81-bench.log" | tee -a "$SUMMARY"
    exit 0
fi
if [ "$STAGE" = rag ]; then  # issue 7: the RAG prefix-sharing benchmark
    PROFILE=$("$PY" -c "import torch; print('h200-141gb' if 'H200' in torch.cuda.get_device_name() else 'h100-80gb')")
    RAND=/tmp/edgepaged-smollm2-random
    EMBED=.carry/minilm-fp16
    if [ ! -f "$EMBED/model.safetensors" ]; then
        say "== $EMBED is missing: write it with scripts/write_embedding_copy.py before the call and carry .carry; stopping"
        exit 1
    fi
    # The marker file says the folder came from random_init (older folders lack it: write again).
    if [ ! -f "$RAND/edgepaged-random-weights.json" ]; then
        run 60-random-model 120 "$PY" -c "
from pathlib import Path; import torch
from edgepaged.models.random_init import write_random_model
write_random_model(Path('$RAND'), 'smollm2-135m', tokenizer_from=Path('.carry/smollm2-tokenizer'), dtype=torch.bfloat16)" || exit 1
    fi
    # Killed at 240 s; the script itself starts no round after ~210 s, so a slow card still
    # reports the rounds it finished (every mode over the same questions).
    run 61-bench-rag 240 "$PY" scripts/bench_rag.py --model "$RAND" --embedding-model "$EMBED" --profile "$PROFILE" \
        --backend triton --questions 200 --max-tokens 32 --budget-s 210
    grep -h -E "^ *(canonical|score|no-cache):|^indexed|^time budget|^rebuilding|^wrote|Error|^error" "$LOGS/61-bench-rag.log" \
        | head -20 | sed 's/^/   /' | tee -a "$SUMMARY"
    exit 0
fi
if [ "$STAGE" = serving ]; then
    PROFILE=$("$PY" -c "import torch; print('h200-141gb' if 'H200' in torch.cuda.get_device_name() else 'h100-80gb')")
    RAND=/tmp/edgepaged-smollm2-random
    run 40-random-model 120 "$PY" -c "
from pathlib import Path; import torch
from edgepaged.models.random_init import write_random_model
write_random_model(Path('$RAND'), 'smollm2-135m', tokenizer_from=Path('.carry/smollm2-tokenizer'), dtype=torch.bfloat16)"
    run 41-test-probe-gpu 60 "$PY" -m pytest -q -p no:cacheprovider -rfE -m gpu tests/test_probe.py &
    run 42-aot-launch 150 "$PY" scripts/check_aot_launch_gpu.py --out "docs/benchmarks/tensorrt-aot-launch-$CARD-$(date -u +%F).json" &
    wait
    run 43-bench-memory 240 "$PY" scripts/bench_memory.py --model "$RAND" --backend triton
    run 44-bench-serve 150 "$PY" scripts/bench_serve.py --model "$RAND" --profile "$PROFILE" --backend triton --max-tokens 128
    grep -h -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)|exceed|over budget|FAIL" "$LOGS"/4*.log | head -20 | sed 's/^/   /' | tee -a "$SUMMARY"
    if [ -n "${WITH_BENCH:-}" ]; then  # the GPU benchmark again, with the time left
        run 45-bench-checkpoints 200 "$PY" scripts/bench_gpu.py --prepare-only --models-dir /tmp/edgepaged-bench-models
        run 46-bench 600 "$PY" scripts/bench_gpu.py --models-dir /tmp/edgepaged-bench-models --budget-s $(($(left) - 40))
        grep -E "^  (MET|MISS|n/a)" "$LOGS/46-bench.log" | tee -a "$SUMMARY"
    fi
    exit 0
fi

# -- 2. tests and checkpoints, in parallel --------------------------------------------------------
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfE)
run 10-test-kernels-decode 300 "${PYTEST[@]}" tests/test_kernels_gpu.py -k "decode" &
run 11-test-kernels-rest 300 "${PYTEST[@]}" tests/test_kernels_gpu.py -k "not decode" &
run 12-test-graphs-engine 300 "${PYTEST[@]}" -m gpu tests/test_cuda_graph_gpu.py tests/test_triton_engine.py \
    tests/test_gpu_parity.py &
run 13-bench-checkpoints 300 "$PY" scripts/bench_gpu.py --prepare-only --models-dir "$MODELS" &
wait
grep -h -E "^(FAILED|ERROR) | in [0-9.]+s( \(.*\))?$" "$LOGS"/1[012]-*.log | sed 's/^/   /' | tee -a "$SUMMARY"

# -- 3. kernel timings ---------------------------------------------------------------------------
run 20-check-kernels 90 "$PY" scripts/check_kernels_gpu.py --skip-tests \
    --out "docs/benchmarks/kernels-$CARD-$(date -u +%F).json"

# -- 4. the benchmark, with what is left (it stops starting parts 30 s before its budget ends) ---
BUDGET=$(($(left) - 60))
run 30-bench 600 "$PY" scripts/bench_gpu.py --models-dir "$MODELS" --budget-s "$BUDGET"
grep -E "^  (MET|MISS|n/a)" "$LOGS/30-bench.log" | tee -a "$SUMMARY"
