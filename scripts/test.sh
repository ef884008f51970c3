#!/usr/bin/env bash
# Set up .venv, then run everything CI runs: ruff (lint + format check), mypy (the service, workers,
# benchmarks and scripts, with the core they import), the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
# Headless Chromium for tests/service/test_browser.py: Debian's packages, installed when missing (as
# root with apt; elsewhere install them yourself, or set CDSP_TEST_SKIP_BROWSER=1 to skip that test).
if { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; } && [ "${CDSP_TEST_SKIP_BROWSER:-}" != 1 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium and chromium-driver (apt) for the browser test"
    (apt-get update -q && apt-get install -y -q chromium chromium-driver) >/tmp/cdsp-apt.log 2>&1 ||
      { tail -20 /tmp/cdsp-apt.log; echo "error: could not install chromium (log /tmp/cdsp-apt.log)" >&2; exit 1; }
  else
    echo "note: no /usr/bin/chromium: tests/service/test_browser.py will fail (apt-get install chromium chromium-driver)"
  fi
fi
echo "== ruff"; ruff check . && ruff format --check .
echo "== mypy"; mypy service workers benchmarks scripts/gpu-pack.py
echo "== pytest"; pytest -q -ra "$@"
