#!/bin/bash
# Every CUDA test in the repository on the GPU machine (CI has no GPU, so these skip there).
# Needs in the copied tree: .whl/ (fastapi, uvicorn, pydantic, gguf, xgrammar, pytest-asyncio,
# fla-core … wheels the GPU image lacks). The image's transformers (5.17) has every hybrid config
# these tests build (a carried 5.25 failed to import there: its huggingface_hub wants httpx2).
# The whole set takes ~7 min on an H100 (2026-12-06: 290 s reached ~73%): split it over two
# calls on one warm machine by passing test files, e.g. `bash bench/gpu_tests.sh
# tests/unit/test_cuda_moe.py` (files given replace the default list).
# Usage there: OUT=<dir> bash bench/gpu_tests.sh [test files or pytest args]
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 -c "import fla; print('fla', fla.__version__)" 2>&1 | tail -1
FILES=(tests/unit/test_cuda_*.py tests/unit/test_gated_delta_cuda.py tests/unit/test_engine_async.py
       tests/unit/test_warm_up.py)
[ $# -gt 0 ] && FILES=("$@")
timeout ${TEST_TIMEOUT:-540} python3 -m pytest -q -p no:cacheprovider -rs --durations=10 "${FILES[@]}" 2>&1 | tee ${OUT:-/tmp}/pytest_cuda.log | tail -40
