#!/bin/bash
# Builds llama.cpp for the CPU (llama-bench, llama-server) into /tmp/llamacpp-cpu, detached.
#
# Why: scripts/bench_cpu.py --llama-cpp compares edgepaged's CPU path with llama.cpp's on the same
# GGUF file. This is a benchmark step, not CI: it takes 10-20 minutes on 2 shared cores, so it runs
# at nice 19 in the background and writes BUILD_RC=<rc> to the log when done. GGML_NATIVE=ON
# because the binaries run on the box that builds them (AVX2/AVX-512 as the CPU has them); no
# OpenSSL, no web UI download (the box may be offline; the benchmark only uses /completion).
#
#   bash scripts/build_llamacpp_cpu.sh [SOURCE_TARBALL]     # default /work/shared/peers/llamacpp-src.tar.gz
#   grep BUILD_RC /tmp/llamacpp-cpu/build.log               # done?
#   python3 scripts/bench_cpu.py --llama-cpp /tmp/llamacpp-cpu/llama.cpp/build/bin
set -u
SRC=${1:-/work/shared/peers/llamacpp-src.tar.gz}
W=${W:-/tmp/llamacpp-cpu}
JOBS=${JOBS:-$(nproc)}
mkdir -p "$W"
B=$W/llama.cpp/build/bin
if [ -x "$B/llama-bench" ] && [ -x "$B/llama-server" ]; then echo "already built: $B"; exit 0; fi
[ -d "$W/llama.cpp" ] || tar xzf "$SRC" -C "$W"
cd "$W/llama.cpp" || exit 1
setsid nohup nice -n 19 bash -c "t0=\$(date +%s); cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF > $W/build.log 2>&1 && \
  cmake --build build -j $JOBS --target llama-bench llama-server >> $W/build.log 2>&1; \
  echo BUILD_RC=\$? after \$((\$(date +%s)-t0)) s >> $W/build.log" >/dev/null 2>&1 &
echo "building in the background at nice 19; see $W/build.log"
