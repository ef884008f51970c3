#!/usr/bin/env bash
# Set up .venv, then run the main job: start the control plane with its embedded defaults (SQLite,
# local artifacts, a local Ray head), generate the synthetic dataset, submit the synthetic
# pipeline over REST, follow it, print the mIoU and the checkpoint, and shut everything down.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
cdsp demo --config configs/synthetic-demo.yaml "$@"
