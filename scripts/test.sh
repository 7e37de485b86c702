#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# test-only system tools (never for `serve.sh`): headless Chromium for the status-page test, tmux
# for the `pensieve run` test — each only when missing and apt is usable; cheap otherwise
bash scripts/install_chromium.sh
bash scripts/install_tmux.sh
exec .venv/bin/python -m pytest -q "$@"
