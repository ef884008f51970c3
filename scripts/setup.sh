#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv at the repo root and install the project into
# it in editable mode with pip. Re-running is cheap: nothing is reinstalled unless pyproject.toml
# changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
# The torch build we test with, and the one the Docker images pin (tests/deploy check they agree).
# pip takes both from local disk on these machines; a bare range may settle on an older build.
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: Python >= 3.11 is required ($PY is $("$PY" -V 2>&1))" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv"
  "$PY" -m venv .venv
fi
# pip with its output filtered (a warning every install prints); a failed install stops here, before
# the stamp is written, with pip's own messages.
pip_quiet() {
  local out
  if ! out=$(.venv/bin/python -m pip install -q "$@" 2>&1); then
    printf '%s\n' "$out" >&2
    echo "error: pip install $* failed" >&2
    exit 1
  fi
  printf '%s\n' "$out" | grep -v -e '^WARNING: Location' -e '^$' || true
}
stamp=.venv/.cdsp-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing the project and its dependencies into .venv (pip, editable)"
  # A newer pip is nice to have, not needed: without an index it stays as it is.
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || echo "note: pip was not upgraded"
  # shellcheck disable=SC2086
  pip_quiet $TORCH_PINS
  # shellcheck disable=SC2086
  pip_quiet -e ".[dev]" $TORCH_PINS
  .venv/bin/python -c 'import cdsp_core, workers, service, torch, ray' # fails loudly if the install did not
  echo "$want" >"$stamp"
fi
