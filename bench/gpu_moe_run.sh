#!/bin/bash
# Issue 11's MoE table: a random-weight Qwen3-30B-A3B shape at Q4_K_M (~17 GB: hidden 2048, 48
# layers, 32 heads, 4 KV heads, head_dim 128, 128 experts top-8 of width 768, SmolLM2's vocabulary
# from .gpu/tokenizer.gguf) served by Pensieve (experts as their codes, backends/cuda_moe.py) and
# by llama.cpp's llama-server on the same file, driven by the same client (bench/gpu_bench.py:
# decode b=1, 8 and 32 streams, cold ~12k prefill, warm follow-up TTFT, GPU memory, start-to-ready),
# one after the other on one GPU; plus the CUDA MoE tests and the in-process kernel timings
# (bench/gpu_moe_kernels.py).
#
# One command, resumable across device calls (state in /tmp/moe; each phase skips what is done and
# what BUDGET seconds no longer leave room for), e.g. on one warm machine:
#   call 1:  TESTS=1 GGUF=1 BUDGET=570 bash bench/gpu_moe_run.sh  # build starts, tests, kernels, GGUF
#   call 2:  BENCH=1 BUDGET=570 bash bench/gpu_moe_run.sh   # waits for the build, both servers
# (a fresh machine in call 2 redoes the GGUF and the build first). TESTS=1 NO_LLAMA=1 alone: the
# CUDA MoE tests and kernel timings only (KSWEEP=1: with the tile sweep). Needs in the tree: .whl/,
# .gpu/tokenizer.gguf, .gpu/llama.cpp (see bench/gpu_qwen_vs_llamacpp.sh). Writes $OUT/summary.md,
# $OUT/gpu_moe_kernels.md and $OUT/moe_logs.tgz.
cd "$(dirname "$0")/.."
T0=$(date +%s); BUDGET=${BUDGET:-570}
left() { echo $((BUDGET - ($(date +%s) - T0))); }
S=${STATE:-/tmp/moe}; mkdir -p $S; OUT=${OUT:-$S/out}; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
[ -d /tmp/site/fastapi ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader | tee $S/gpu.txt

# llama-server (CUDA, sm_90) from the carried tree, built in the background under its own session
if [ -z "$NO_LLAMA" ] && [ ! -e $S/build.started ] && [ -d .gpu/llama.cpp ]; then
  touch $S/build.started; rm -rf /tmp/llsrc; cp -a .gpu/llama.cpp /tmp/llsrc
  setsid nohup nice -n 5 bash -c "cmake -S /tmp/llsrc -B /tmp/llbuild -G Ninja -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF && cmake --build /tmp/llbuild -j 16 --target llama-server; \
    echo \$? > $S/build.rc" > $S/build.log 2>&1 < /dev/null &
fi

if [ -n "$TESTS" ] && [ ! -e $S/tests.done ] && [ $(left) -gt 200 ]; then
  timeout $(( $(left) < 300 ? $(left) - 60 : 240 )) python3 -m pytest -q -p no:cacheprovider \
    tests/unit/test_cuda_moe.py > $S/pytest.log 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|^E |FAILED|Error" $S/pytest.log | head -12 | cut -c1-300
  touch $S/tests.done
fi
if [ -n "$TESTS" ] && [ ! -e $OUT/gpu_moe_kernels.md ] && [ $(left) -gt 150 ]; then
  timeout $(( $(left) - 90 )) python3 -m bench.gpu_moe_kernels --out $OUT ${KSWEEP:+--sweep} \
    > $S/kernels.log 2>&1
  echo "kernels rc=$?"; tail -14 $S/kernels.log
fi

M=/tmp/qwen3-30b-a3b-q4_k_m.gguf
if [ -n "$BENCH$GGUF" ] && [ ! -e $M.done ] && [ $(left) -gt 240 ]; then
  python3 -m bench.make_random_gguf $M --arch qwen3moe --dtype q4_k_m --hidden 2048 --layers 48 \
    --heads 32 --kv-heads 4 --head-dim 128 --intermediate 6144 --experts 128 --experts-used 8 \
    --expert-intermediate 768 --context-length 32768 --tokenizer-from .gpu/tokenizer.gguf \
    > $S/gguf.log 2>&1 && touch $M.done
  tail -1 $S/gguf.log
fi

if [ -n "$BENCH" ] && [ -e $M.done ]; then
  SC=${SCENARIOS:-decode,x8,x32,ttft1}
  if [ ! -e $S/p/gpu_bench.json ] && [ $(left) -gt 200 ]; then
    setsid -w timeout $(( $(left) - 20 )) python3 -m bench.gpu_bench --out $S/p --repeat 3 \
      --scenarios $SC --gguf $M --serve-args "--weights auto" --ready-timeout 400 > $S/bench_p.log 2>&1 &
    G=$!; wait $G; echo "pensieve rc=$?"; kill -- -$G 2>/dev/null
    grep -E "^\| " $S/bench_p.log | cut -c1-120
    grep -E "MoE experts|warmed up|captured|ready in|Traceback|Error" $S/p/server.log | cut -c1-200 | head -8
  fi
  while [ -z "$NO_LLAMA" ] && [ ! -e $S/build.rc ] && [ $(left) -gt 150 ]; do sleep 5; done
  echo "build rc=$(cat $S/build.rc 2>/dev/null) ($(tail -1 $S/build.log 2>/dev/null | cut -c1-120))"
  if [ -z "$NO_LLAMA" ] && [ ! -e $S/l/gpu_bench.json ] && [ -x /tmp/llbuild/bin/llama-server ] \
      && [ $(left) -gt 150 ]; then
    R0=$(date +%s)
    /tmp/llbuild/bin/llama-server -m $M -ngl 99 -fa on --jinja -c 32768 -np 32 -kvu --port 8080 \
      $LLAMA_ARGS > $S/llama_server.log 2>&1 & LP=$!
    for i in $(seq 240); do python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/health', timeout=2)" 2>/dev/null && break; sleep 1; done
    echo "llama-server ready in $(( $(date +%s) - R0 )) s" | tee $S/llama_ready.txt
    timeout $(( $(left) - 15 )) python3 -m bench.gpu_bench --url http://127.0.0.1:8080 --server-pid $LP \
      --gguf $M --out $S/l --repeat 3 --scenarios $SC > $S/bench_l.log 2>&1
    echo "llama.cpp rc=$?"; grep -E "^\| " $S/bench_l.log | cut -c1-120
    kill $LP; wait $LP 2>/dev/null
  fi
fi
tar czf $OUT/moe_logs.tgz -C $S --exclude='*.gguf' . 2>/dev/null
{ cat $S/gpu.txt; for d in $S/p $S/l; do [ -e $d/gpu_bench.md ] && { echo "## $(basename $d)"; cat $d/gpu_bench.md; }; done
  cat $S/llama_ready.txt 2>/dev/null; [ -e $OUT/gpu_moe_kernels.md ] && { echo "## kernels"; cat $OUT/gpu_moe_kernels.md; }; } > $OUT/summary.md
cat $OUT/summary.md
exit 0
