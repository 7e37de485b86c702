#!/bin/bash
# BENCHMARKS.md's "GPU: random Qwen2.5-7B / Qwen3-8B shapes at Q4_K_M vs llama.cpp (same file)":
# both servers on the same random-weight Q4_K_M GGUFs, driven by the same client
# (bench/gpu_bench.py's scenarios over /v1/messages), one after the other on one GPU.
#
# Resumable across device calls (state in /tmp/qr; each phase skips what is done), so it can be
# split over two calls of <= 10 min on one warm machine:
#   call 1:  TESTS=1 BUDGET=560 bash bench/gpu_qwen_vs_llamacpp.sh  # build starts, GGUFs, CUDA tests
#   call 2:  BENCH=1 BUDGET=570 bash bench/gpu_qwen_vs_llamacpp.sh  # waits for the build, 4 servers
# Needs in the copied tree: .whl/ (fastapi, uvicorn, pydantic, gguf, pytest-asyncio… wheels),
# .gpu/tokenizer.gguf (`python -m bench.make_random_gguf --tokenizer-only .gpu/tokenizer.gguf`)
# and .gpu/llama.cpp (the llama-cpp-python 0.3.36 sdist's vendor/llama.cpp minus models/, docs/,
# tests/, examples/ and the non-CUDA ggml backends: ~39 MB). Logs: $OUT/qwen_logs.tgz, summary.md.
cd "$(dirname "$0")/.."
T0=$(date +%s); BUDGET=${BUDGET:-560}
left() { echo $((BUDGET - ($(date +%s) - T0))); }
S=${STATE:-/tmp/qr}; mkdir -p $S
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
[ -d /tmp/site/fastapi ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader | tee $S/gpu.txt

# llama-server (CUDA, sm_90) from the carried tree, built in the background under its own session
if [ ! -e $S/build.started ] && [ -d .gpu/llama.cpp ]; then
  touch $S/build.started; rm -rf /tmp/llsrc; cp -a .gpu/llama.cpp /tmp/llsrc
  setsid nohup nice -n 5 bash -c "cmake -S /tmp/llsrc -B /tmp/llbuild -G Ninja -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF && cmake --build /tmp/llbuild -j 16 --target llama-server; \
    echo \$? > $S/build.rc" > $S/build.log 2>&1 < /dev/null &
fi

Q2=/tmp/qwen25-7b-q4_k_m.gguf; Q3=/tmp/qwen3-8b-q4_k_m.gguf
gen() { [ -e $1.done ] && return; python3 -m bench.make_random_gguf $1 --dtype q4_k_m \
    --tokenizer-from .gpu/tokenizer.gguf "${@:2}" > $S/gguf_$(basename $1).log 2>&1 && touch $1.done
  tail -1 $S/gguf_$(basename $1).log; }
gen $Q2 --arch qwen2 --hidden 3584 --layers 28 --heads 28 --kv-heads 4 --intermediate 18944
gen $Q3 --arch qwen3 --hidden 4096 --layers 36 --heads 32 --kv-heads 8 --head-dim 128 --intermediate 12288
[ -n "$QONLY" ] && exit 0  # the GGUFs only (bench/gpu_int4_device.sh writes them in the background)

if [ -n "$TESTS" ] && [ ! -e $S/tests.done ]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider tests/unit/test_cuda_families.py \
    tests/unit/test_cuda_attention.py tests/unit/test_cuda_layers.py tests/unit/test_cuda_int4.py \
    tests/unit/test_cuda_int4_gemm.py tests/unit/test_cuda_int8.py \
    tests/unit/test_engine_async.py tests/unit/test_warm_up.py > $S/pytest.log 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|^E |FAILED|Error" $S/pytest.log | head -12 | cut -c1-300
  touch $S/tests.done
fi

if [ -n "$BENCH" ]; then
  while [ ! -e $S/build.rc ] && [ $(left) -gt 60 ]; do sleep 5; done
  echo "build rc=$(cat $S/build.rc 2>/dev/null) ($(tail -1 $S/build.log | cut -c1-120))"
  SC=${SCENARIOS:-decode,x8,ttft1,followup}
  pens() { [ -e $S/p_$1/gpu_bench.json ] && return; [ $(left) -lt 150 ] && { echo "skip pensieve $1"; return; }
    setsid -w timeout $(( $(left) - 20 )) python3 -m bench.gpu_bench --out $S/p_$1 --repeat 3 \
      --max-num-seqs ${PENSIEVE_SEQS:-32} --scenarios $SC --gguf $2 --serve-args "--weights auto" --ready-timeout 240 > $S/bench_p_$1.log 2>&1 &
    local G=$!; wait $G; echo "pensieve $1 rc=$?"; kill -- -$G 2>/dev/null; grep -E "^\| (x|decode|prefill|followup|cold|warm|GPU)" $S/bench_p_$1.log | cut -c1-110
    grep -E "GPU memory|warmed up|captured|ready in|Traceback|Error" $S/p_$1/server.log | cut -c1-300 | head -6; }
  # LLAMA_ARGS: extra llama-server flags (e.g. "--cache-ram 0"), LTAG: suffix of its result folder
  llama() { [ -e $S/l_$1$LTAG/gpu_bench.json ] && return; [ -x /tmp/llbuild/bin/llama-server ] || { echo "no llama-server"; return; }
    [ $(left) -lt 120 ] && { echo "skip llama $1"; return; }
    /tmp/llbuild/bin/llama-server -m $2 -ngl 99 -fa on --jinja -c 16384 -np 8 -kvu --port 8080 $LLAMA_ARGS \
      > $S/llama_server_$1$LTAG.log 2>&1 & LP=$!
    for i in $(seq 120); do python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/health', timeout=2)" 2>/dev/null && break; sleep 1; done
    timeout $(( $(left) - 15 )) python3 -m bench.gpu_bench --url http://127.0.0.1:8080 --server-pid $LP \
      --gguf $2 --out $S/l_$1$LTAG --repeat 3 --scenarios ${LSC:-$SC} > $S/bench_l_$1$LTAG.log 2>&1
    echo "llama.cpp $1$LTAG rc=$?"; grep -E "^\| (x|decode|prefill|followup|cold|warm|GPU)" $S/bench_l_$1$LTAG.log | cut -c1-110
    kill $LP; wait $LP 2>/dev/null; }
  for m in ${MODELS:-qwen25 qwen3}; do
    f=$Q2; [ $m = qwen3 ] && f=$Q3
    [ -z "$NO_PENSIEVE" ] && pens $m $f; llama $m $f
  done
fi
tar czf $OUT/qwen_logs.tgz -C $S --exclude='*.gguf' . 2>/dev/null
for d in $S/p_* $S/l_*; do [ -e $d/gpu_bench.md ] && { echo "## $(basename $d)"; cat $d/gpu_bench.md; }; done > $OUT/summary.md
exit 0
