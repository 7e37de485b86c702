#!/bin/bash
# The hybrid CUDA kernels of issue 15 checked and timed in one device call (≤ 600 s, no server,
# no GGUF): the CUDA tests of the fused Gated DeltaNet step, the (1 + w) RMSNorm, the routers
# (softmax, sigmoid, gpt-oss), the MLA glue, the expert-major MoE GEMV, the hybrid decode graphs (tokens with the graphs = eager) and the hybrid families on
# CUDA through the engine (tokens = the CPU torch path, follow-up from a checkpoint), then one
# Gated DeltaNet layer at Qwen3.6's shape (bench/gdn_step.py: torch/fla path vs the fused kernels, µs a layer
# step, decode b=1/8 eager and graphed, chunks 16-1024) and one decode step's attention
# (bench/hybrid_attention.py), and one layer's router / MLA glue, torch form vs the one-launch
# kernels (bench/hybrid_glue.py). Needs .whl/ in the tree (fla-core, the test deps).
# Usage there: OUT=<dir> bash bench/gpu_hybrid_kernels.sh
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}; mkdir -p $OUT
TESTS=${TESTS:-"tests/unit/test_cuda_gdn.py tests/unit/test_cuda_offset_norm.py tests/unit/test_cuda_router.py tests/unit/test_cuda_router_sigmoid.py tests/unit/test_cuda_router_gpt_oss.py tests/unit/test_cuda_hybrid_mla_rope.py tests/unit/test_cuda_moe_expert.py tests/unit/test_cuda_hybrid_graphs.py tests/unit/test_cuda_hybrid.py"}
TEST_TIMEOUT=${TEST_TIMEOUT:-300} OUT=$OUT bash bench/gpu_tests.sh $TESTS
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout ${BENCH_TIMEOUT:-120} python3 -m bench.gdn_step 2>&1 | tee $OUT/gdn_step.log
timeout ${BENCH_TIMEOUT:-120} python3 -m bench.hybrid_attention --batches 1 8 --contexts 20000 \
  2>&1 | tee $OUT/hybrid_attention.log | tail -20
timeout ${BENCH_TIMEOUT:-120} python3 -m bench.hybrid_glue 2>&1 | tee $OUT/hybrid_glue.log
