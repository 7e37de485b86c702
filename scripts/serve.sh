#!/usr/bin/env bash
# Set up (if needed) and serve the default model on http://127.0.0.1:7777. Extra args go to
# `pensieve serve` (e.g. --model PATH, --port N).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pensieve serve "$@"
