#!/bin/bash
# BENCHMARKS.md's "GPU: one int4 layout" run (issue 11 items 3-4): the one-layout int4 kernels
# (gemv_words, skinny, the dequantising gemm) on the random 8B Q4_0 file and the random Qwen2.5-7B
# / Qwen3-8B Q4_K_M files, Pensieve at its defaults against llama-server on the same file.
# Two calls on one warm machine (state in /tmp/qr, as bench/gpu_qwen_vs_llamacpp.sh):
#   PHASE=1 bash bench/gpu_int4_device.sh   # llama.cpp build in background, GGUFs, CUDA tests,
#                                           # kernel plans (bench.gpu_int4_plan); KERNELS=1: also
#                                           # the in-process 8B model (bench.gpu_kernels)
#   PHASE=2 bash bench/gpu_int4_device.sh   # served: 8B Q4_0 both servers, then the Qwen pair
#   PHASE=ab BUDGET=330 bash bench/gpu_int4_device.sh   # shortest: 8B Q4_0, one layout vs
#                                           # --keep-dense-weights, plans, then CUDA tests
#   PHASE=one BUDGET=450 bash bench/gpu_int4_device.sh  # one short call: plans, 8B Q4_0 served by
#                                           # both, the int4/int8 CUDA tests while llama.cpp builds
# Needs .whl/, .gpu/tokenizer.gguf and .gpu/llama.cpp carried (see gpu_qwen_vs_llamacpp.sh).
cd "$(dirname "$0")/.."
T0=$(date +%s); BUDGET=${BUDGET:-560}
left() { echo $((BUDGET - ($(date +%s) - T0))); }
S=${STATE:-/tmp/qr}; mkdir -p $S; OUT=${OUT:-$S}
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
if [ "$PHASE" = one ] && [ ! -e $S/build.started ]; then  # the llama.cpp build first: it is the long pole
  touch $S/build.started; rm -rf /tmp/llsrc; cp -rL .gpu/llama.cpp /tmp/llsrc
  setsid nohup nice -n 5 bash -c "cmake -S /tmp/llsrc -B /tmp/llbuild -G Ninja -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF && cmake --build /tmp/llbuild -j 16 --target llama-server; \
    echo \$? > $S/build.rc" > $S/build.log 2>&1 < /dev/null &
fi
[ -d /tmp/site/fastapi ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
Q4=/tmp/llama8b-random-q4_0.gguf

if [ "$PHASE" = 1 ]; then
  nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader | tee $S/gpu.txt
  python3 -c "import torch,triton;print('torch',torch.__version__,'triton',triton.__version__)"
  if [ ! -e $S/build.started ] && [ -d .gpu/llama.cpp ]; then
    touch $S/build.started; rm -rf /tmp/llsrc; cp -a .gpu/llama.cpp /tmp/llsrc
    setsid nohup nice -n 5 bash -c "cmake -S /tmp/llsrc -B /tmp/llbuild -G Ninja -DGGML_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=OFF && cmake --build /tmp/llbuild -j 16 --target llama-server; \
      echo \$? > $S/build.rc" > $S/build.log 2>&1 < /dev/null &
  fi
  # the GGUFs in the background too (setsid: they outlive this call)
  setsid nohup bash -c "python3 -m bench.make_random_gguf $Q4 --dtype q4_0 --tokenizer-from .gpu/tokenizer.gguf \
      --device cpu > $S/gguf_q4.log 2>&1 && touch $Q4.done" < /dev/null > /dev/null 2>&1 &
  setsid nohup bash -c "QONLY=1 bash bench/gpu_qwen_vs_llamacpp.sh" < /dev/null > $S/gguf_qwen.log 2>&1 &
  timeout ${TEST_TIMEOUT:-180} python3 -m pytest -q -p no:cacheprovider tests/unit/test_cuda_int4_gemm.py \
    tests/unit/test_cuda_int4.py tests/unit/test_cuda_int8.py tests/unit/test_cuda_layers.py \
    tests/unit/test_cuda_families.py > $OUT/pytest.log 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|^E |FAILED|Error" $OUT/pytest.log | head -14 | cut -c1-300
  timeout 90 python3 -m bench.gpu_int4_plan --out $OUT > $OUT/plan.log 2>&1
  echo "plan rc=$?"; grep -E "x[0-9]+ \(|left out|Error" $OUT/plan.log | cut -c1-1500
  if [ -n "$KERNELS" ]; then  # the in-process 8B step timings (bench/gpu_kernels.py)
    timeout 150 python3 -m bench.gpu_kernels --skip-attention --int4 --dense --out $OUT > $OUT/kernels.log 2>&1
    echo "kernels rc=$?"; grep -E "graph_ms|\"ms\"|tok_s|weight_GB|followup|capture_s" $OUT/kernels.log | cut -c1-300 | head -40
  fi
  echo "build: $(cat $S/build.rc 2>/dev/null || echo running) $(tail -1 $S/build.log | cut -c1-100)"
  ls -la /tmp/*.gguf* 2>/dev/null
fi

if [ "$PHASE" = 2 ]; then
  while [ ! -e $Q4.done ] && [ $(left) -gt 300 ]; do sleep 2; done
  SC=${SCENARIOS:-decode,x8,ttft1}
  setsid -w timeout 200 python3 -m bench.gpu_bench --out $S/p_q4 --repeat 3 --max-num-seqs 0 \
    --scenarios $SC --gguf $Q4 --serve-args "--weights auto" --ready-timeout 150 > $S/bench_p_q4.log 2>&1
  echo "pensieve q4_0 rc=$?"; grep -E "^\| (x|decode|prefill|cold|warm|GPU)" $S/bench_p_q4.log | cut -c1-140
  grep -E "GPU memory|int4 layers|warmed up|captured|ready in|Traceback|Error" $S/p_q4/server.log | cut -c1-400 | head -8
  while [ ! -e $S/build.rc ] && [ $(left) -gt 250 ]; do sleep 3; done
  if [ -x /tmp/llbuild/bin/llama-server ]; then
    /tmp/llbuild/bin/llama-server -m $Q4 -ngl 99 -fa on --jinja -c 16384 -np 8 -kvu --cache-ram 0 --port 8080 \
      > $S/llama_server_q4.log 2>&1 & LP=$!
    for i in $(seq 90); do python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/health', timeout=2)" 2>/dev/null && break; sleep 1; done
    timeout 120 python3 -m bench.gpu_bench --url http://127.0.0.1:8080 --server-pid $LP --gguf $Q4 \
      --out $S/l_q4 --repeat 3 --scenarios $SC > $S/bench_l_q4.log 2>&1
    echo "llama.cpp q4_0 rc=$?"; grep -E "^\| (x|decode|prefill|cold|warm|GPU)" $S/bench_l_q4.log | cut -c1-140
    kill $LP; wait $LP 2>/dev/null
  else echo "no llama-server: $(tail -3 $S/build.log)"; fi
  # the Qwen pair: Pensieve at its defaults, llama-server with --cache-ram 0
  BENCH=1 BUDGET=$(left) SCENARIOS=decode,x8 LLAMA_ARGS="--cache-ram 0" PENSIEVE_SEQS=0 \
    MODELS="${MODELS:-qwen3 qwen25}" bash bench/gpu_qwen_vs_llamacpp.sh
fi
if [ "$PHASE" = one ]; then  # all in one call when device time is short: 8B Q4_0 only
  nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader
  python3 -m bench.make_random_gguf $Q4 --dtype q4_0 --tokenizer-from .gpu/tokenizer.gguf > $S/gguf_q4.log 2>&1
  tail -1 $S/gguf_q4.log
  timeout 60 python3 -m bench.gpu_int4_plan --models llama8b --out $OUT > $OUT/plan.log 2>&1
  echo "plan rc=$?"; grep -E "x[0-9]+ \(|left out|Error" $OUT/plan.log | cut -c1-1800
  setsid -w timeout 150 python3 -m bench.gpu_bench --out $S/p_q4 --repeat 3 --max-num-seqs 0 \
    --scenarios decode,x8,ttft1 --gguf $Q4 --serve-args "--weights auto" --ready-timeout 110 > $S/bench_p_q4.log 2>&1
  echo "pensieve q4_0 rc=$?"; grep -E "^\| (x|decode|prefill|cold|warm|GPU)" $S/bench_p_q4.log | cut -c1-140
  grep -E "GPU memory|warmed up|captured|ready in|Traceback|Error" $S/p_q4/server.log | cut -c1-300 | head -8
  cp $S/p_q4/server.log $OUT/server_q4.log 2>/dev/null
  timeout ${TEST_TIMEOUT:-100} python3 -m pytest -q -p no:cacheprovider tests/unit/test_cuda_int4_gemm.py \
    tests/unit/test_cuda_int4.py tests/unit/test_cuda_int8.py > $OUT/pytest.log 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|^E |FAILED|Error" $OUT/pytest.log | head -14 | cut -c1-300
  while [ ! -e $S/build.rc ] && [ $(left) -gt 70 ]; do sleep 3; done
  echo "build: $(cat $S/build.rc 2>/dev/null || echo unfinished) $(tail -1 $S/build.log | cut -c1-100)"
  if [ -x /tmp/llbuild/bin/llama-server ]; then
    /tmp/llbuild/bin/llama-server -m $Q4 -ngl 99 -fa on --jinja -c 16384 -np 8 -kvu --cache-ram 0 --port 8080 \
      > $S/llama_server_q4.log 2>&1 & LP=$!
    for i in $(seq 60); do python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/health', timeout=2)" 2>/dev/null && break; sleep 1; done
    timeout $(( $(left) - 5 )) python3 -m bench.gpu_bench --url http://127.0.0.1:8080 --server-pid $LP --gguf $Q4 \
      --out $S/l_q4 --repeat 3 --scenarios decode,x8 > $S/bench_l_q4.log 2>&1
    echo "llama.cpp q4_0 rc=$?"; grep -E "^\| (x|decode|prefill|cold|warm|GPU)" $S/bench_l_q4.log | cut -c1-140
    kill $LP; wait $LP 2>/dev/null
  fi
fi
if [ "$PHASE" = ab ]; then  # shortest: the one layout against --keep-dense-weights (the kernels of before)
  nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader
  python3 -m bench.make_random_gguf $Q4 --dtype q4_0 --tokenizer-from .gpu/tokenizer.gguf > $S/gguf_q4.log 2>&1
  tail -1 $S/gguf_q4.log
  timeout 50 python3 -m bench.gpu_int4_plan --models llama8b --out $OUT > $OUT/plan.log 2>&1
  echo "plan rc=$?"; grep -E "x[0-9]+ \(|left out|Error" $OUT/plan.log | cut -c1-1800
  for v in ${VARIANTS:-one: dense:--keep-dense-weights}; do
    n=${v%%:*}
    setsid -w timeout 120 python3 -m bench.gpu_bench --out $S/p_$n --repeat 3 --max-num-seqs 0 \
      --scenarios decode,x8,ttft1 --gguf $Q4 --serve-args "--weights auto ${v#*:}" --ready-timeout 90 > $S/bench_$n.log 2>&1
    echo "pensieve $n rc=$?"; grep -E "^\| (x|decode|prefill|cold|warm|GPU)" $S/bench_$n.log | cut -c1-140
    grep -E "GPU memory|ready in|Traceback|Error" $S/p_$n/server.log | cut -c1-300 | head -5
    cp $S/p_$n/server.log $OUT/server_$n.log 2>/dev/null
  done
  [ $(left) -gt 30 ] && timeout $(( $(left) - 5 )) python3 -m pytest -q -p no:cacheprovider tests/unit/test_cuda_int4_gemm.py \
    tests/unit/test_cuda_int4.py tests/unit/test_cuda_int8.py > $OUT/pytest.log 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|^E |FAILED|Error" $OUT/pytest.log | head -14 | cut -c1-300
fi
for d in $S/p_* $S/l_*; do [ -e $d/gpu_bench.md ] && { echo "## $(basename $d)"; cat $d/gpu_bench.md; }; done > $OUT/summary.md 2>/dev/null
tar czf $OUT/logs.tgz -C $S --exclude='*.gguf' . 2>/dev/null
exit 0
