#!/usr/bin/env bash
# tmux for the terminal-chat test (tests/integration/test_run_tmux.py drives `pensieve run` in
# a tmux pane), from Debian's `tmux` package. Idempotent: nothing to do when tmux is on PATH;
# never fails the set-up — without root or apt the test skips and says why.
set -uo pipefail

command -v tmux >/dev/null 2>&1 && exit 0
if ! command -v apt-get >/dev/null 2>&1 || [[ $(id -u) -ne 0 ]]; then
  echo "pensieve setup: tmux missing and not installable here; the pensieve run test will be skipped" >&2
  exit 0
fi
echo "pensieve setup: installing tmux (apt) for the pensieve run test" >&2
log=$(mktemp)
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q tmux >"$log" 2>&1; then
  apt-get update -q >>"$log" 2>&1 && apt-get install -y -q tmux >>"$log" 2>&1 \
    || { tail -5 "$log" >&2; echo "pensieve setup: tmux install failed; the pensieve run test will be skipped" >&2; }
fi
rm -f "$log"
exit 0
