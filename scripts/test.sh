#!/usr/bin/env bash
# Set up .venv, then run everything CI runs: ruff (lint + format check), mypy, the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"; ruff check . && ruff format --check .
echo "== mypy"; mypy service workers
echo "== pytest"; pytest -q -ra "$@"
