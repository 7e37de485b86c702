#!/bin/bash
# Builds, on this (CPU) machine, what the GPU scripts (bench/gpu_session.sh and the ones it calls)
# need carried to the device machine, none of which is tracked (`.git/info/exclude` ignores /.whl/
# and /.gpu/):
#   .whl/                the Python wheels the GPU image lacks (fastapi, uvicorn, pydantic, gguf,
#                        pytest-asyncio, fla …), for CPython 3.12 manylinux x86-64
#   .gpu/tokenizer.gguf  a real Qwen2 tokenizer from the fixtures, for the random-weight GGUFs
#   .gpu/llama.cpp       the llama-cpp-python 0.3.36 sdist's vendor/llama.cpp, minus models/, docs/,
#                        tests/, examples/ and the non-CUDA ggml backends (~40 MB)
#   .gpu/templates       that tree's models/templates (real chat templates)
#   .gpu/head.tar        `git archive HEAD` (gpu_session.sh runs its pipeline on it)
# Idempotent: each part is skipped when present (HEAD's archive is always rewritten).
# Usage: bash bench/gpu_prepare.sh   (then carry `.whl .gpu/tokenizer.gguf .gpu/llama.cpp
# .gpu/templates .gpu/head.tar`)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
mkdir -p .gpu
PY=${PY:-.venv/bin/python}

# The GPU image has torch, triton, transformers, tokenizers, jinja2, numpy, httpx, prometheus-client
# (KINDS.md's package list); these are what it lacks, at the versions this checkout's .venv holds
# (the newest where .venv lacks one). One version each: two stop the install there.
NAMES="fastapi starlette uvicorn pydantic pydantic-core annotated-types annotated-doc typing-inspection
gguf pytest-asyncio opentelemetry-api importlib-metadata zipp anthropic distro jiter docstring-parser
fla-core flash-linear-attention"
WHEELS=$($PY -c '
import sys
from importlib.metadata import PackageNotFoundError, version
for n in sys.argv[1:]:
    try:
        print(f"{n}=={version(n)}")
    except PackageNotFoundError:
        print(n)
' $NAMES)
if [ ! -e .whl/.done ]; then
  mkdir -p .whl
  for w in $WHEELS; do
    ls .whl/"$(echo ${w%%==*} | tr - _)"-* >/dev/null 2>&1 && continue
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "$w"
  done
  touch .whl/.done
fi

[ -e .gpu/tokenizer.gguf ] || $PY -m bench.make_random_gguf --tokenizer-only .gpu/tokenizer.gguf

if [ ! -d .gpu/llama.cpp ] || [ ! -d .gpu/templates ]; then
  T=$(mktemp -d)
  $PY -m pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$T"
  tar xzf "$T"/llama_cpp_python-0.3.36.tar.gz -C "$T"
  V="$T"/llama_cpp_python-0.3.36/vendor/llama.cpp
  rm -rf .gpu/templates; cp -a "$V"/models/templates .gpu/templates
  rm -rf "$V"/models "$V"/docs "$V"/tests "$V"/examples "$V"/media
  for b in "$V"/ggml/src/ggml-*/; do
    case $(basename "$b") in ggml-cpu|ggml-cuda) ;; *) rm -rf "$b";; esac
  done
  rm -rf .gpu/llama.cpp; mv "$V" .gpu/llama.cpp; rm -rf "$T"
fi

git archive HEAD -o .gpu/head.tar
du -sh .whl .gpu/tokenizer.gguf .gpu/llama.cpp .gpu/templates .gpu/head.tar
