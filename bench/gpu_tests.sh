#!/bin/bash
# Every CUDA test in the repository on the GPU machine (CI has no GPU, so these skip there).
# Needs in the copied tree: .whl/ (fastapi, uvicorn, pydantic, gguf, xgrammar, pytest-asyncio,
# fla-core … wheels the GPU image lacks) and optionally .whl2/ (transformers 5.25 and the
# versions it needs, for the hybrid families' reference configs; the image has 5.17).
# Usage there: OUT=<dir> bash bench/gpu_tests.sh [pytest args]
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl $(ls .whl2/*.whl 2>/dev/null) || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 -c "import fla; print('fla', fla.__version__)" 2>&1 | tail -1
timeout ${TEST_TIMEOUT:-540} python3 -m pytest -q -p no:cacheprovider -rs --durations=10 \
    tests/unit/test_cuda_*.py tests/unit/test_gated_delta_cuda.py tests/unit/test_engine_async.py \
    tests/unit/test_warm_up.py "$@" 2>&1 | tee ${OUT:-/tmp}/pytest_cuda.log | tail -40
