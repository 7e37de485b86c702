#!/bin/bash
# The device run behind BENCHMARKS.md's "Claude Code load, tools vs none" table (issue 10):
# the CUDA tests of the sampler / grammar-mask / int8 / family code, then bench/cc_load.py (8
# Claude Code-shaped sessions × 3 turns, 2 tools vs none, alternating rounds) against Pensieve
# with its defaults on the random 8B Q4_0 file; then, if OLD=<dir of engine files> is given and
# time is left, the same load on a copy of the tree with those engine files swapped in (the
# code before the batched masks/sampler). Needs .whl/ and .gpu/tokenizer.gguf as
# gpu_device_run.sh. Usage there: OUT=<dir> [OLD=.gpu/old] bash bench/gpu_device_run.sh cc
cd "$(dirname "$0")/.."
T0=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader
Q4=/tmp/llama8b-random-q4_0.gguf
python3 -m bench.make_random_gguf $Q4 --dtype q4_0 --tokenizer-from .gpu/tokenizer.gguf --device cpu > $OUT/gguf.log 2>&1 &
GPID=$!
TESTS=${TESTS:-"tests/unit/test_bitmask.py tests/unit/test_sampler.py tests/unit/test_grammar.py
  tests/unit/test_engine_async_grammar.py tests/unit/test_cuda_int8.py tests/unit/test_cuda_families.py
  tests/unit/test_engine_async.py"}
timeout ${TEST_TIMEOUT:-230} python3 -m pytest -q -p no:cacheprovider $TESTS > $OUT/pytest.log 2>&1
echo "pytest rc=$? at $((SECONDS-T0)) s"; grep -E "passed|failed|^E |FAILED" $OUT/pytest.log | head -12 | cut -c1-300
wait $GPID; tail -1 $OUT/gguf.log
serve() {  # serve <tree> <log>: Pensieve with its defaults on the Q4_0 file, port 7799
  (cd $1 && PYTHONPATH=/tmp/site:$1 python3 -m pensieve.cli.main serve --model $Q4 --device cuda \
     --port 7799 --context-length 32768 > $2 2>&1 &)
  for i in $(seq 240); do curl -sf 127.0.0.1:7799/health > /dev/null && return 0; sleep 1; done
  echo "server not ready"; tail -5 $2; return 1
}
load() {  # load <name>
  timeout ${LOAD_TIMEOUT:-150} python3 -m bench.cc_load --url http://127.0.0.1:7799 --sessions 8 \
    --turns 3 --rounds ${ROUNDS:-4} --max-tokens 256 --mode ${MODE:-both} --json $OUT/cc_$1.json 2>&1 | tail -12
  pkill -f "pensieve.cli.main serve"; sleep 3
}
serve $PWD $OUT/server_new.log && { echo "== new (batched masks + sampler) ready at $((SECONDS-T0)) s"; load new; }
grep -E "warmed up|ready in|WARNING|ERROR" $OUT/server_new.log | head -6 | cut -c1-200
if [ -n "$OLD" ] && [ $((SECONDS-T0)) -lt 420 ]; then
  rm -rf /tmp/old && mkdir /tmp/old && cp -r pensieve bench tests /tmp/old/ && cp $OLD/*.py /tmp/old/pensieve/engine/
  serve /tmp/old $OUT/server_old.log && { echo "== old (per-row masks + sampler) ready at $((SECONDS-T0)) s"; load old; }
fi
echo "done at $((SECONDS-T0)) s"
