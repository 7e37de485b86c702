#!/usr/bin/env bash
# Build a separate venv with llama-cpp-python[server] (from source) used only as a
# comparison baseline by bench/compare_cpu.py. Idempotent: exits early if the venv
# already imports llama_cpp.server. Takes ~6 min on 2 cores. Never run this in CI.
#
#   bash bench/llamacpp_env.sh            # -> /work/main/.bench-venv (or $BENCH_VENV)
#   LLAMA_CPP_PYTHON_VERSION=0.3.16 bash bench/llamacpp_env.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BENCH_VENV:-$ROOT/.bench-venv}"
PY="${PYTHON:-python3}"
SPEC="llama-cpp-python[server]"
if [[ -n "${LLAMA_CPP_PYTHON_VERSION:-}" ]]; then
    SPEC="llama-cpp-python[server]==${LLAMA_CPP_PYTHON_VERSION}"
fi

if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import llama_cpp, llama_cpp.server" 2>/dev/null; then
    echo "llama-cpp-python already importable in $VENV ($("$VENV/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)'))"
    exit 0
fi

"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --upgrade pip wheel >/dev/null
# Build from source. Not GGML_NATIVE (llama.cpp's default): on these VMs it enables AMX and the
# build segfaults on its first forward pass; AVX-512 on, AMX off (ASSETS.md).
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
echo "building $SPEC in $VENV with CMAKE_ARGS=$CMAKE_ARGS (several minutes)..."
"$VENV/bin/python" -m pip install --no-binary llama-cpp-python --no-cache-dir "$SPEC"
"$VENV/bin/python" -c "import llama_cpp, llama_cpp.server; print('llama-cpp-python', llama_cpp.__version__, 'OK')"
