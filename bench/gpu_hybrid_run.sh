#!/bin/bash
# Issue 15 item 6: random-weight GGUFs in the hybrid families' real shapes (bench/make_random_gguf.py
# --arch qwen35moe|gpt-oss|deepseek2: Qwen3.6-35B-A3B Q4_K_M ~21 GB, gpt-oss-20b MXFP4 ~13 GB,
# GLM-4.7-Flash Q4_K_M ~18 GB; SmolLM2's tokenizer padded to the real vocabularies) served by
# Pensieve (serve flags at their defaults) and by llama.cpp's llama-server (defaults, then
# --cache-ram 0) on the same file, driven by the same client (bench/gpu_bench.py): decode b=1,
# 8 streams aggregate, and bench/cc_ttft.py's Claude Code turn 1 (~20k tokens, cold) vs the
# follow-up turn's TTFT on that prefix. Prints bench/gpu_hybrid_table.py's markdown table.
#
# Resumable across device calls (state in /tmp/hy; each phase skips what is done and what BUDGET
# seconds no longer leave room for); one family a call fits 10 minutes best:
#   FAMILY=qwen35moe  BUDGET=570 bash bench/gpu_hybrid_run.sh   # build starts, GGUF, 3 servers
#   FAMILY=gpt-oss    BUDGET=570 bash bench/gpu_hybrid_run.sh
#   FAMILY=glm47flash BUDGET=570 bash bench/gpu_hybrid_run.sh   # (FAMILY=all: each in turn)
# A family's GGUF and Pensieve's packed copy of it are deleted once its three runs are done
# (KEEP=1 keeps them; the disk holds one family at a time). SCENARIOS (default decode,x8,cc),
# REPEAT (2), CC_TOOLS (cc with fewer tools: a shorter prompt). Needs in the tree: .whl/,
# .gpu/tokenizer.gguf, .gpu/llama.cpp (see bench/gpu_qwen_vs_llamacpp.sh), .gpu/templates (the
# families' .jinja files from llama.cpp's models/templates: Qwen3.5-4B, openai-gpt-oss-120b, GLM-4.7-Flash). DRY=1: CPU only (no nvidia-smi, no build, pensieve on cpu).
# Writes $OUT/summary.md and $OUT/hybrid_logs.tgz.
cd "$(dirname "$0")/.."
T0=$(date +%s); BUDGET=${BUDGET:-570}
left() { echo $((BUDGET - ($(date +%s) - T0))); }
S=${STATE:-/tmp/hy}; mkdir -p $S; OUT=${OUT:-$S/out}; mkdir -p $OUT
PY=${PY:-python3}; export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
if [ -z "$DRY" ]; then
  [ -d /tmp/site/fastapi ] || $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl || exit 1
  nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader | tee $S/gpu.txt
fi

# llama-server (CUDA, sm_90) from the carried tree, built in the background under its own session
if [ -z "$DRY$NO_LLAMA" ] && [ ! -e $S/build.started ] && [ -d .gpu/llama.cpp ]; then
  touch $S/build.started; rm -rf /tmp/llsrc; cp -a .gpu/llama.cpp /tmp/llsrc
  setsid nohup nice -n 5 bash -c "cmake -S /tmp/llsrc -B /tmp/llbuild -G Ninja -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF && cmake --build /tmp/llbuild -j 16 --target llama-server; \
    echo \$? > $S/build.rc" > $S/build.log 2>&1 < /dev/null &
fi

SC=${SCENARIOS:-decode,x8,cc}; REPEAT=${REPEAT:-3}; TOK=${TOKENIZER:-.gpu/tokenizer.gguf}
DEVICE=cuda; [ -n "$DRY" ] && DEVICE=cpu
# family → GGUF path and make_random_gguf arguments (SHAPE: extra ones, e.g. a down-scaled dry run)
file_of() { case $1 in qwen35moe) echo $S/q36-35b-a3b-q4_k_m.gguf;; gpt-oss) echo $S/gpt-oss-20b-mxfp4.gguf;;
  glm47flash) echo $S/glm-4.7-flash-q4_k_m.gguf;; esac; }
arch_of() { case $1 in glm47flash) echo deepseek2;; *) echo $1;; esac; }
# the family's real chat template (llama.cpp's models/templates, carried in .gpu/templates), so both
# servers render Claude Code's 24 tools into the prompt as that family does (~20k tokens)
template_of() { local t; case $1 in qwen35moe) t=Qwen3.5-4B;; gpt-oss) t=openai-gpt-oss-120b;;
  glm47flash) t=GLM-4.7-Flash;; esac; [ -e ${TEMPLATES:-.gpu/templates}/$t.jinja ] \
  && echo "--chat-template ${TEMPLATES:-.gpu/templates}/$t.jinja"; }

gen() {  # $1 family
  local f=$(file_of $1); [ -e $f.done ] && return 0
  [ $(left) -lt 240 ] && { echo "skip writing $1 ($(left) s left)"; return 1; }
  $PY -m bench.make_random_gguf $f --arch $(arch_of $1) --tokenizer-from $TOK $(template_of $1) $SHAPE \
    > $S/gguf_$1.log 2>&1 && touch $f.done; tail -1 $S/gguf_$1.log; [ -e $f.done ]; }

pens() {  # $1 family
  local d=$S/p_$1; [ -e $d/gpu_bench.json ] && return
  [ $(left) -lt 200 ] && { echo "skip pensieve $1 ($(left) s left)"; return; }
  local dtype=""; [ -n "$DRY" ] && dtype="--dtype float32"
  # gpu_bench's own flags: --device, --dtype bfloat16 (--serve-args may override); the rest defaults
  setsid -w timeout $(( $(left) - 20 )) $PY -m bench.gpu_bench --out $d --repeat $REPEAT \
    --max-num-seqs 0 --scenarios $SC --gguf $(file_of $1) --ready-timeout 400 \
    --decode-tokens ${DECODE_TOKENS:-256} ${CC_TOOLS:+--cc-tools $CC_TOOLS} --serve-args "--device $DEVICE $dtype $PENSIEVE_ARGS" \
    > $S/bench_p_$1.log 2>&1 &
  local G=$!; wait $G; echo "pensieve $1 rc=$?"; kill -- -$G 2>/dev/null
  grep -E "^\| " $S/bench_p_$1.log | cut -c1-140
  grep -E "GPU memory|warmed up|captured|ready in|Traceback|Error" $d/server.log 2>/dev/null | cut -c1-200 | head -6; }

llama() {  # $1 family, $2 tag (l: defaults, l0: --cache-ram 0), $3 extra llama-server flags
  local d=$S/$2_$1 f=$(file_of $1); [ -e $d/gpu_bench.json ] && return
  [ -x ${LLAMA_SERVER:=/tmp/llbuild/bin/llama-server} ] || { echo "no llama-server"; return; }
  [ $(left) -lt 150 ] && { echo "skip llama $2 $1 ($(left) s left)"; return; }
  local R0=$(date +%s) ngl="-ngl 99 -fa on" tpl=""; [ -n "$DRY" ] && ngl="-ngl 0"
  # random gpt-oss weights never write harmony: llama-server's harmony parser then throws and
  # streams nothing ("unparsed peg-native output"), so it gets ChatML there (its prompt differs:
  # compare decode and streams, and the CC row only by its own prompt token count)
  [ $1 = gpt-oss ] && tpl="--chat-template chatml"
  $LLAMA_SERVER -m $f $ngl --jinja $tpl -c 65536 -np 8 -kvu --port 8080 $3 > $S/llama_server_$2_$1.log 2>&1 & LP=$!
  for i in $(seq 300); do $PY -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/health', timeout=2)" 2>/dev/null && break; sleep 1; done
  echo "llama-server $2 $1 ready in $(( $(date +%s) - R0 )) s"
  timeout $(( $(left) - 15 )) $PY -m bench.gpu_bench --url http://127.0.0.1:8080 --server-pid $LP \
    --gguf $f --out $d --repeat $REPEAT --scenarios $SC --decode-tokens ${DECODE_TOKENS:-256} \
    ${CC_TOOLS:+--cc-tools $CC_TOOLS} > $S/bench_$2_$1.log 2>&1
  echo "llama.cpp $2 $1 rc=$?"; grep -E "^\| " $S/bench_$2_$1.log | cut -c1-140
  kill $LP; wait $LP 2>/dev/null; }

FAMS=${FAMILY:-all}; [ "$FAMS" = all ] && FAMS="qwen35moe gpt-oss glm47flash"
for fam in $FAMS; do
  [ -e $S/$fam.done ] && continue
  gen $fam || break
  [ -z "$NO_PENSIEVE" ] && pens $fam
  if [ -z "$NO_LLAMA" ]; then
    while [ -z "$DRY" ] && [ ! -e $S/build.rc ] && [ $(left) -gt 200 ]; do sleep 5; done
    [ -z "$DRY" ] && echo "build rc=$(cat $S/build.rc 2>/dev/null) ($(tail -1 $S/build.log 2>/dev/null | cut -c1-120))"
    llama $fam l ""; llama $fam l0 "--cache-ram 0"
  fi
  if [ -e $S/p_$fam/gpu_bench.json ] && { [ -n "$NO_LLAMA" ] || [ -e $S/l0_$fam/gpu_bench.json ]; }; then
    touch $S/$fam.done
    [ -z "$KEEP" ] && { f=$(file_of $fam); rm -f $f; rm -f ~/.cache/pensieve/packed/$(basename $f .gguf)-*; }
  fi
done
tar czf $OUT/hybrid_logs.tgz -C $S --exclude='*.gguf' --exclude='*.pack' . 2>/dev/null
{ cat $S/gpu.txt 2>/dev/null; $PY -m bench.gpu_hybrid_table $S; } > $OUT/summary.md
cat $OUT/summary.md
exit 0
