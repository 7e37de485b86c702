#!/bin/bash
# One device session's GPU work as a pipeline that outlives each device call: the first call starts
# it under its own process session (setsid) and every call (the first too) follows it for up to
# BUDGET seconds, then copies what is done to $OUT. Calls made back to back on one warm machine
# (it goes back after 30 s idle) therefore lose no time between phases, unlike per-call scripts.
#   BUDGET=585 bash bench/gpu_session.sh     # call 1, 2, 3 … (the same command each time)
# DENSE: the dense files to bench (default "q4 qwen3"; "qwen25" adds the Qwen2.5-7B Q4_K_M shape). Steps, in order, each once (state in /tmp/gs; progress in /tmp/gs/progress):
#   background: llama-server build (CUDA sm_90, from .gpu/llama.cpp), the random GGUFs (8B Llama
#     Q4_0, Qwen3-8B Q4_K_M, Qwen3-30B-A3B Q4_K_M), each written once;
#   tests   every CUDA test (~7+ min on an H100; TESTS: the files; TESTS=none skips; TEST_ENV: settings
#           for them, e.g. "PENSIEVE_INT4_GEMV_V2=1");
#   dense   Pensieve at its defaults (SAME_KV=1: the KV cache sized as llama-server's context, --kv-cache-gb, for the memory row only) on the 8B Q4_0 and the Qwen3-8B Q4_K_M file, then llama-server
#           (--cache-ram 0) on the same files: decode b=1, 8 streams, cold 12k / warm TTFT;
#   moe     the same on the 30B-A3B file: decode, 8 and 32 streams, cold/warm TTFT, Claude Code load
#           (MOE_SC: other scenarios, e.g. "decode,x8,ttft1");
#   kernels in-process kernel tables (KERNEL_BENCHES: bench/gpu_int4_gemv.py, gpu_q6k.py, mla_attention.py);
#   pvariants  Pensieve on VARIANT_FILES (q4 qwen3 moe; default qwen3) once more per VARIANTS entry
#           "tag=VAR=value,VAR2=value" (e.g. "v2=PENSIEVE_INT4_GEMV_V2=1 nopool=PENSIEVE_WEIGHTS_POOL=0"):
#           p_<file>_<tag> beside p_<file>, the same scenarios;
#   abkernels  KERNEL_AB's tables on this tree, on .gpu/base.tar's commit and on this tree with the
#           old int4 layout for Q4_K experts (PENSIEVE_MOE_Q4K_SUPER=0), one after the other;
#   start   bench/gpu_start.sh (a CUDA start phase by phase) on the files written;
#   hybrid  bench/gpu_hybrid_run.sh for HYBRID families (default all three), the dense files deleted.
# STEPS (default "tests dense moe hybrid") picks and orders them; pdense/pmoe and ldense/lmoe are
# the Pensieve and the llama-server halves of dense/moe (e.g. "pdense pmoe tests ldense lmoe": the
# tests run while llama-server builds). Needs .whl/, .gpu/tokenizer.gguf
# .gpu/llama.cpp and .gpu/templates carried (see bench/gpu_qwen_vs_llamacpp.sh); .gpu/tune.tgz (an earlier
# session's $OUT/tune.tgz: the kernel plans) where there is one. Writes $OUT/summary.md,
# $OUT/progress.txt, $OUT/pytest_cuda.log and $OUT/gs_logs.tgz (every Pensieve server there writes
# PENSIEVE_STEP_TIMES under $S/steps, summarised in summary.md). The pipeline runs on a copy of the
# first call's tree (/tmp/w; or of .gpu/head.tar where carried): later calls may carry an edited tree
# without disturbing it.
cd "$(dirname "$0")/.."
S=/tmp/gs; mkdir -p $S
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
export PENSIEVE_PROFILE_SKIP=${PENSIEVE_PROFILE_SKIP:-100}  # past the warm-up: in the first decode run
Q4=/tmp/llama8b-random-q4_0.gguf; Q3=/tmp/qwen3-8b-q4_k_m.gguf; M=/tmp/qwen3-30b-a3b-q4_k_m.gguf
Q2=/tmp/qwen25-7b-q4_k_m.gguf

log() { echo "$(date +%T) $*" >> $S/progress; }
wait_for() { while [ ! -e $1 ]; do sleep 3; done; }
wait_gguf() { while [ ! -e $1.done ] && [ ! -e $S/gguf_chain.done ]; do sleep 3; done; [ -e $1.done ]; }

gguf_chain() {  # CPU-bound writers, one after the other
  python3 -m bench.make_random_gguf $Q4 --dtype q4_0 --tokenizer-from .gpu/tokenizer.gguf \
    > $S/gguf_q4.log 2>&1 && touch $Q4.done; log "gguf 8B q4_0: $(tail -1 $S/gguf_q4.log | cut -c1-100)"
  python3 -m bench.make_random_gguf $Q3 --dtype q4_k_m --tokenizer-from .gpu/tokenizer.gguf --arch qwen3 \
    --hidden 4096 --layers 36 --heads 32 --kv-heads 8 --head-dim 128 --intermediate 12288 \
    > $S/gguf_q3.log 2>&1 && touch $Q3.done; log "gguf qwen3-8b: $(tail -1 $S/gguf_q3.log | cut -c1-100)"
  if [[ "${DENSE:-q4 qwen3}" == *qwen25* ]]; then
    python3 -m bench.make_random_gguf $Q2 --dtype q4_k_m --tokenizer-from .gpu/tokenizer.gguf --arch qwen2 \
      --hidden 3584 --layers 28 --heads 28 --kv-heads 4 --intermediate 18944 \
      > $S/gguf_q2.log 2>&1 && touch $Q2.done; log "gguf qwen2.5-7b: $(tail -1 $S/gguf_q2.log | cut -c1-100)"
  fi
  [[ "$STEPS" == *moe* || -z "$STEPS" ]] || { touch $S/gguf_chain.done; return; }  # no MoE step: skip its 17 GB file
  python3 -m bench.make_random_gguf $M --arch qwen3moe --dtype q4_k_m --hidden 2048 --layers 48 \
    --heads 32 --kv-heads 4 --head-dim 128 --intermediate 6144 --experts 128 --experts-used 8 \
    --expert-intermediate 768 --context-length 32768 --tokenizer-from .gpu/tokenizer.gguf \
    $([ -e .gpu/templates/Qwen3-Coder.jinja ] && echo --chat-template .gpu/templates/Qwen3-Coder.jinja) \
    > $S/gguf_moe.log 2>&1 && touch $M.done; log "gguf 30b-a3b: $(tail -1 $S/gguf_moe.log | cut -c1-100)"
  touch $S/gguf_chain.done
}

pens() {  # $1 tag, $2 file, $3 scenarios, $4 the KV cache in GiB llama-server's context takes (same memory row)
  [ -e $S/p_$1/gpu_bench.json ] && return; log "pensieve $1 start"
  mkdir -p $S/p_$1; PENSIEVE_STEP_TIMES=$S/steps/p_$1 PENSIEVE_PROFILE_STEPS=${PROFILE_STEPS:-10}:$S/p_$1/profile.txt \
  env ${PENV:-PENSIEVE_NO_VARIANT=1} setsid -w timeout 420 python3 -m bench.gpu_bench --out $S/p_$1 --repeat 3 --max-num-seqs 0 \
    --scenarios $3 --gguf $2 --serve-args "--weights auto${SAME_KV:+ --kv-cache-gb $4}" --ready-timeout 300 > $S/bench_p_$1.log 2>&1
  log "pensieve $1 rc=$?"
  grep -E "GPU memory|weights|KV|warmed up|captured|ready in|Traceback|Error" $S/p_$1/server.log 2>/dev/null \
    | cut -c1-300 | head -10 >> $S/progress; }

llama() {  # $1 tag, $2 file, $3 scenarios, $4 context, $5 slots
  [ -e $S/l_$1/gpu_bench.json ] && return; wait_for $S/build.rc
  [ -x /tmp/llbuild/bin/llama-server ] || { log "no llama-server: $(tail -2 $S/build.log)"; return; }
  log "llama $1 start"; local R0=$(date +%s)
  /tmp/llbuild/bin/llama-server -m $2 -ngl 99 -fa on --jinja -c $4 -np $5 -kvu --cache-ram 0 --port 8080 \
    > $S/llama_server_$1.log 2>&1 & local LP=$!
  for i in $(seq 300); do python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/health', timeout=2)" 2>/dev/null && break; sleep 1; done
  log "llama-server $1 ready in $(( $(date +%s) - R0 )) s"
  timeout 420 python3 -m bench.gpu_bench --url http://127.0.0.1:8080 --server-pid $LP --gguf $2 \
    --out $S/l_$1 --repeat 3 --scenarios $3 > $S/bench_l_$1.log 2>&1
  log "llama $1 rc=$?"; kill $LP; wait $LP 2>/dev/null; }

pipeline() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl > $S/pip.log 2>&1 || { log "pip failed"; return; }
  nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader > $S/gpu.txt
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> $S/gpu.txt 2>&1
  log "start on $(head -1 $S/gpu.txt)"
  # kernel plans an earlier device session timed (keyed by GPU, software and kernel code, so a
  # stale one is ignored): a cold start's ~150-200 s of tuner compiles become a check
  [ -e .gpu/tune.tgz ] && mkdir -p ~/.cache/pensieve && tar -xzf .gpu/tune.tgz -C ~/.cache/pensieve \
    && log "tune plans from .gpu/tune.tgz: $(ls ~/.cache/pensieve/tune | wc -l) files"
  if [ -e .gpu/llbuild.tar.xz ]; then  # a build an earlier call packed (below): no 4-5 min build
    mkdir -p /tmp/llbuild && tar -xJf .gpu/llbuild.tar.xz -C /tmp/llbuild && /tmp/llbuild/bin/llama-server --version \
      > $S/build.log 2>&1; echo $? > $S/build.rc; log "llama-server from .gpu/llbuild.tar.xz rc=$(cat $S/build.rc)"
  else
  rm -rf /tmp/llsrc; cp -a .gpu/llama.cpp /tmp/llsrc
  ( nice -n 5 cmake -S /tmp/llsrc -B /tmp/llbuild -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
      -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    && nice -n 5 cmake --build /tmp/llbuild -j 12 --target llama-server; echo $? > $S/build.rc
    log "llama-server build rc=$(cat $S/build.rc)"
    # packed for later calls (PACK_LLAMA=1 sends it back in <= 15 MB parts: cat them into
    # .gpu/llbuild.tar.xz here and carry that instead of .gpu/llama.cpp)
    [ "$(cat $S/build.rc)" = 0 ] && (cd /tmp/llbuild && tar -cf - bin/llama-server $(ls bin/*.so* 2>/dev/null) | xz -T0 -6 > $S/llbuild.tar.xz) \
      && log "llbuild.tar.xz $(du -h $S/llbuild.tar.xz | cut -f1)" ) > $S/build.log 2>&1 &
  fi
  gguf_chain &
  for step in ${STEPS:-tests dense moe hybrid}; do
    case $step in
      tests)
        [ "$TESTS" = none ] && continue; log "tests start"
        # one pytest a file, each under its share of TEST_TIMEOUT: a file cut short still leaves the
        # others' tracebacks (one run cut at the limit prints no failure's traceback at all)
        FILES=$(ls ${TESTS:-tests/unit/test_cuda_*.py tests/unit/test_gated_delta_cuda.py tests/unit/test_engine_async*.py \
          tests/unit/test_warm_up.py tests/unit/test_tune_cache.py}); NF=$(echo $FILES | wc -w)
        PER=$(( ${TEST_TIMEOUT:-540} / NF > 30 ? ${TEST_TIMEOUT:-540} / NF : 30 )); : > $S/pytest_cuda.log
        for f in $FILES; do
          env ${TEST_ENV:-PENSIEVE_NO_VARIANT=1} timeout ${TEST_FILE_TIMEOUT:-$PER} python3 -m pytest -v -p no:cacheprovider -rs --tb=short $f \
            >> $S/pytest_cuda.log 2>&1; echo "== $f rc=$?" >> $S/pytest_cuda.log; done
        log "tests: $(grep -c ' PASSED' $S/pytest_cuda.log) passed, $(grep -c ' FAILED' $S/pytest_cuda.log) failed, $(grep -c 'rc=124' $S/pytest_cuda.log) files cut at their limit"
        grep -E "FAILED|ERROR" $S/pytest_cuda.log | head -20 | cut -c1-250 >> $S/progress;;
      dense|pdense)
        D=${DENSE:-q4 qwen3}
        [[ $D == *q4* ]] && wait_gguf $Q4 && pens q4 $Q4 decode,x8,ttft1 2
        [[ $D == *qwen3* ]] && wait_gguf $Q3 && pens qwen3 $Q3 decode,x8,ttft1 2.25
        [[ $D == *qwen25* ]] && wait_gguf $Q2 && pens qwen25 $Q2 decode,x8,ttft1 0.9
        [ $step = pdense ] && continue
        [[ $D == *q4* ]] && [ -e $Q4.done ] && llama q4 $Q4 decode,x8,ttft1 16384 8
        [[ $D == *qwen3* ]] && [ -e $Q3.done ] && llama qwen3 $Q3 decode,x8,ttft1 16384 8
        [[ $D == *qwen25* ]] && [ -e $Q2.done ] && llama qwen25 $Q2 decode,x8,ttft1 16384 8;;
      ldense)
        D=${DENSE:-q4 qwen3}
        [[ $D == *q4* ]] && [ -e $Q4.done ] && llama q4 $Q4 decode,x8,ttft1 16384 8
        [[ $D == *qwen3* ]] && [ -e $Q3.done ] && llama qwen3 $Q3 decode,x8,ttft1 16384 8
        [[ $D == *qwen25* ]] && [ -e $Q2.done ] && llama qwen25 $Q2 decode,x8,ttft1 16384 8;;
      moe|pmoe)
        wait_gguf $M || continue; pens moe $M ${MOE_SC:-decode,x8,x32,ttft1,cc} 3
        [ $step = moe ] && llama moe $M ${MOE_SC:-decode,x8,x32,ttft1,cc} 32768 32;;
      pvariants)  # Pensieve again under other settings, same files: VARIANTS="tag=VAR=1,VAR2=0 …"
        for v in $VARIANTS; do tag=${v%%=*}; envs=${v#*=}
          for f in ${VARIANT_FILES:-qwen3}; do
            case $f in q4) F=$Q4; KV=2;; qwen3) F=$Q3; KV=2.25;; moe) F=$M; KV=3;; *) continue;; esac
            wait_gguf $F && PENV="${envs//,/ }" pens ${f}_$tag $F decode,x8,ttft1 $KV; done; done;;
      lmoe)
        [ -e $M.done ] && llama moe $M ${MOE_SC:-decode,x8,x32,ttft1,cc} 32768 32;;
      kernels)  # in-process kernel tables (no server): Q6_K tiles, the latent-attention kernel
        # an entry's ':' are spaces: "gpu_moe_kernels:--sweep:--tokens:1,8" passes it arguments
        for e in ${KERNEL_BENCHES:-gpu_int4_gemv gpu_q6k mla_attention}; do b=${e%%:*}
          log "kernels $e start"; timeout ${KERNEL_TIMEOUT:-150} python3 -m bench.${e//:/ } > $S/kernels_$b.log 2>&1
          log "kernels $b rc=$?"; done;;
      abkernels)  # the same in-process kernel table on this tree and on .gpu/base.tar (an older commit:
        # git archive <commit> -o .gpu/base.tar), one after the other on this GPU: a kernel change's A/B
        for e in ${KERNEL_AB:-gpu_moe_kernels:--sweep:--tokens:1,8:--mixes:q4_k+q6_k}; do b=${e%%:*}
          for side in head base head_int4; do
            D=/tmp/w; [ $side = base ] && D=/tmp/base; [ -d $D ] || continue
            log "abkernels $e $side start"
            (cd $D && mkdir -p $S/ab_$side && PYTHONPATH=/tmp/site:$D OUT=$S/ab_$side \
              PENSIEVE_MOE_Q4K_SUPER=$([ $side = head_int4 ] && echo 0 || echo 1) \
              timeout ${KERNEL_TIMEOUT:-150} python3 -m bench.${e//:/ } > $S/ab_${b}_$side.log 2>&1)
            log "abkernels $b $side rc=$?"; done; done;;
      start)  # the CUDA start phase by phase on the files already written (bench/gpu_start.sh)
        log "start bench"; OUT=$S/start FILES="${START_FILES:-q4 q3 moe}" timeout 400 bash bench/gpu_start.sh \
          > $S/start.log 2>&1; log "start bench rc=$?";;
      hybrid)
        rm -f $Q4 $Q3; rm -rf ~/.cache/pensieve/packed; mkdir -p $S/hy
        for b in ${HYBRID_BENCHES:-gdn_step}; do  # in-process: one layer's step, torch vs fused
          timeout 150 python3 -m bench.$b > $S/hy/bench_$b.log 2>&1
          log "hybrid bench $b rc=$?"; grep -E "µs|GPU" $S/hy/bench_$b.log | cut -c1-230 >> $S/progress; done
        wait_for $S/build.rc
        touch $S/hy/build.started; cp $S/build.rc $S/hy/build.rc
        for fam in ${HYBRID:-qwen35moe gpt-oss glm47flash}; do
          log "hybrid $fam start"; mkdir -p $S/hy/prof
          PENSIEVE_STEP_TIMES=$S/steps/hy_$fam PENSIEVE_PROFILE_STEPS=${PROFILE_STEPS:-10}:$S/hy/prof/$fam.txt \
            STATE=$S/hy OUT=$S/hy/out FAMILY=$fam BUDGET=900 \
            LLAMA_SERVER=/tmp/llbuild/bin/llama-server bash bench/gpu_hybrid_run.sh > $S/hybrid_$fam.log 2>&1
          log "hybrid $fam rc=$?"
        done;;
    esac
  done
  log "pipeline done"; touch $S/pipeline.done
}

if [ "$1" = pipeline ]; then pipeline; exit 0; fi
T0=$(date +%s); BUDGET=${BUDGET:-585}
if [ ! -e $S/started ]; then  # the pipeline runs on a frozen copy of the first call's tree
  touch $S/started; rm -rf /tmp/w
  if [ -e .gpu/head.tar ]; then  # a commit (git archive HEAD -o .gpu/head.tar), not the live tree
    mkdir -p /tmp/w/.gpu && tar -xf .gpu/head.tar -C /tmp/w && cp -a .whl /tmp/w/ \
      && cp -a $(ls -d .gpu/llama.cpp .gpu/tokenizer.gguf .gpu/templates .gpu/llbuild.tar.xz .gpu/tune.tgz 2>/dev/null) /tmp/w/.gpu/
  else cp -a . /tmp/w; fi
  [ -e .gpu/base.tar ] && rm -rf /tmp/base && mkdir -p /tmp/base && tar -xf .gpu/base.tar -C /tmp/base
  (cd /tmp/w && setsid nohup bash bench/gpu_session.sh pipeline < /dev/null > $S/pipeline.log 2>&1 &)
fi
SEEN=0
while [ ! -e $S/pipeline.done ] && [ $(( $(date +%s) - T0 )) -lt $(( BUDGET - 25 )) ]; do
  sleep 5; N=$(wc -l < $S/progress 2>/dev/null || echo 0)
  [ "$N" -gt "$SEEN" ] && { sed -n "$((SEEN + 1)),${N}p" $S/progress; SEEN=$N; }
done
summary() {
  cat $S/gpu.txt 2>/dev/null
  for d in $S/p_* $S/l_*; do [ -e $d/gpu_bench.md ] && { echo "## $(basename $d)"; cat $d/gpu_bench.md; }; done
  for f in $S/kernels_*.log $S/ab_*.log; do [ -e $f ] && { echo "## $(basename $f .log)"; tail -40 $f; }; done
  [ -e $S/start/start.jsonl ] && { echo "## start"; cat $S/start/start.jsonl; }
  [ -e $S/hy ] && PYTHONPATH=/tmp/site:$PWD python3 -m bench.gpu_hybrid_table $S/hy 2>/dev/null
  for f in $S/p_*/profile.txt $S/hy/prof/*.txt; do  # PENSIEVE_PROFILE_STEPS: each kind's head
    [ -e $f ] && { echo "## profile $f"; grep -A2 "^## " $f; }; done
  for f in $S/p_*/server.log; do  # the tuners' tables (which candidates win: what to prune)
    [ -e $f ] && { echo "## tune lines $f"; grep -hoE "(int4 layers|Q6_K layers|MoE routes).*" $f | cut -c1-6000; }; done
  [ -e $S/steps ] && { echo "## served steps (PENSIEVE_STEP_TIMES: chained = async scheduling)"
    for d in $S/steps/*; do PYTHONPATH=/tmp/site:$PWD python3 -m bench.step_times $d; done; }
}
summary > $OUT/summary.md 2>&1
cp $S/progress $OUT/progress.txt 2>/dev/null; cp $S/pytest_cuda.log $OUT/ 2>/dev/null
[ -d ~/.cache/pensieve/tune ] && tar czf $OUT/tune.tgz -C ~/.cache/pensieve tune  # carry as .gpu/tune.tgz
[ -n "$PACK_LLAMA" ] && [ -e $S/llbuild.tar.xz ] && split -b 15M -d $S/llbuild.tar.xz $OUT/llbuild.tar.xz.part
tar czf $OUT/gs_logs.tgz -C $S --exclude='*.gguf' --exclude='*.pack' --exclude=hy/out . 2>/dev/null
echo "---- $(date +%T) progress so far:"; tail -25 $S/progress; echo "----"; cat $OUT/summary.md
grep -E "passed|failed" $S/pytest_cuda.log 2>/dev/null | tail -3
exit 0
