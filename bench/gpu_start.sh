#!/bin/bash
# A CUDA start's weight conversion on the GPU machine, phase by phase (bench/cuda_start.py), for the
# three random files of bench/gpu_session.sh (8B Llama Q4_0, Qwen3-8B Q4_K_M, Qwen3-30B-A3B Q4_K_M;
# written here when missing, needs .gpu/tokenizer.gguf carried): per file
#   gpu   decoded on the GPU, a fresh tune cache (a first start on a fresh machine: Triton compiles)
#   again decoded on the GPU, the tune cache of the run before (a later start)
#   host  decoded on the host (PENSIEVE_CONVERT_ON=cpu's path), the tune cache again
# Writes $OUT/start.jsonl (one JSON line a run: read/plan/place/move/tune seconds, wall and CPU)
# and $OUT/start.log.   bash bench/gpu_start.sh            FILES="q4 q3 moe" picks the files
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_start}; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-/tmp/site}:$PWD
Q4=/tmp/llama8b-random-q4_0.gguf; Q3=/tmp/qwen3-8b-q4_k_m.gguf; M=/tmp/qwen3-30b-a3b-q4_k_m.gguf
TOK=.gpu/tokenizer.gguf
gen() {  # $1 path, the rest: make_random_gguf's shape arguments
  [ -e $1 ] && return; local f=$1; shift
  python3 -m bench.make_random_gguf $f --tokenizer-from $TOK "$@" >> $OUT/start.log 2>&1
}
for tag in ${FILES:-q4 q3 moe}; do
  case $tag in
    q4) F=$Q4; gen $F --dtype q4_0 ;;
    q3) F=$Q3; gen $F --dtype q4_k_m --arch qwen3 --hidden 4096 --layers 36 --heads 32 --kv-heads 8 \
          --head-dim 128 --intermediate 12288 ;;
    moe) F=$M; gen $F --arch qwen3moe --dtype q4_k_m --hidden 2048 --layers 48 --heads 32 \
          --kv-heads 4 --head-dim 128 --intermediate 6144 --experts 128 --experts-used 8 \
          --expert-intermediate 768 --context-length 32768 ;;
  esac
  TC=$OUT/tune_$tag; rm -rf $TC
  for run in gpu again host; do
    conv="--convert-on cuda"; [ $run = host ] && conv=""
    echo "== $tag $run" >> $OUT/start.log
    PENSIEVE_TUNE_CACHE=$TC python3 -m bench.cuda_start $F --device cuda $conv --label $run \
      --json $OUT/start.jsonl >> $OUT/start.log 2>&1 || echo "$tag $run failed" >> $OUT/start.log
    tail -1 $OUT/start.jsonl
  done
done
