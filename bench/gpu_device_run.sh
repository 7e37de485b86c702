#!/bin/bash
# The device run behind BENCHMARKS.md's GPU table (2026-11-25): CUDA tests, then the int4 (Q4_0)
# server with async scheduling on (default) and off, then (BF16=1) the bf16 server. Needs, in the
# tree copied to the GPU machine: .whl/ (fastapi, pydantic, gguf… wheels the GPU image lacks) and
# .gpu/tokenizer.gguf (`python -m bench.make_random_gguf --tokenizer-only .gpu/tokenizer.gguf`).
# Usage there: OUT=<dir> BF16=1 bash bench/gpu_device_run.sh
# `bash bench/gpu_device_run.sh qwen` runs bench/gpu_qwen_vs_llamacpp.sh instead (random Qwen2.5-7B
# and Qwen3-8B shapes at Q4_K_M, Pensieve vs llama-server on the same files; see that script);
# `bash bench/gpu_device_run.sh cc` runs bench/gpu_cc_load.sh (Claude Code load, tools vs none).
cd "$(dirname "$0")/.."
[ "$1" = qwen ] && exec bash bench/gpu_qwen_vs_llamacpp.sh
[ "$1" = cc ] && exec bash bench/gpu_cc_load.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader
python3 -c "import torch,triton;print('torch',torch.__version__,'triton',triton.__version__)"
Q4=/tmp/llama8b-random-q4_0.gguf; F16=/tmp/llama8b-random-f16.gguf
( python3 -m bench.make_random_gguf $Q4 --dtype q4_0 --tokenizer-from .gpu/tokenizer.gguf --device cpu > $OUT/gguf_q4.log 2>&1
  [ -n "$BF16" ] && python3 -m bench.make_random_gguf $F16 --tokenizer-from .gpu/tokenizer.gguf --device cpu > $OUT/gguf_f16.log 2>&1 ) &
GPID=$!
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -x -p no:cacheprovider tests/unit/test_cuda_attention.py tests/unit/test_cuda_layers.py tests/unit/test_cuda_int4.py tests/unit/test_cuda_int4_gemm.py tests/unit/test_cuda_int8.py tests/unit/test_engine_async.py tests/unit/test_warm_up.py > $OUT/pytest.log 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|^E |FAILED" $OUT/pytest.log | head -12 | cut -c1-300
wait $GPID; tail -1 $OUT/gguf_q4.log; rm -f $OUT/gguf_q4.log
b() { timeout $1 python3 -m bench.gpu_bench --out $OUT/$2 --repeat $3 --scenarios $4 --gguf $5 --serve-args "$6" > $OUT/bench_$2.log 2>&1
  echo "bench $2 rc=$?"; grep -E "^\| (x|decode|prefill|followup|cold|warm|short)" $OUT/bench_$2.log | cut -c1-120
  grep -E "warmed up|engine step|captured|ready in" $OUT/$2/server.log | cut -c1-160 | head -8; rm -f $OUT/$2/server.log $OUT/$2/gpu_bench.md; }
b 330 q4on 5 decode,x8,x32,prefill,followup,ttft1 $Q4 "--weights auto"
b 160 q4off 3 decode,x8,x32 $Q4 "--weights auto --async-scheduling off"
[ -n "$BF16" ] && { tail -1 $OUT/gguf_f16.log; rm -f $OUT/gguf_f16.log; b 200 f16on 3 decode,x8,x32,prefill,followup $F16 ""; }
exit 0
