#!/usr/bin/env bash
# Headless Chromium for the status page's browser test (tests/integration/test_status_page.py),
# from Debian's `chromium` package. Idempotent: nothing to do when a chromium is on PATH; never
# fails the set-up — without root or apt the test skips and says why.
set -uo pipefail

for name in chromium chromium-browser; do
  command -v "$name" >/dev/null 2>&1 && exit 0
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "pensieve setup: no apt-get here; the status-page browser test will be skipped" >&2; exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "pensieve setup: not root, chromium not installed; the status-page browser test will be skipped" >&2; exit 0
fi
echo "pensieve setup: installing chromium (apt) for the status-page test" >&2
log=$(mktemp)
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q chromium >"$log" 2>&1; then
  apt-get update -q >>"$log" 2>&1 && apt-get install -y -q chromium >>"$log" 2>&1 \
    || { tail -5 "$log" >&2; echo "pensieve setup: chromium install failed; the status-page test will be skipped" >&2; }
fi
rm -f "$log"
exit 0
