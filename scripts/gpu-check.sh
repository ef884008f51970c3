#!/usr/bin/env bash
# The one prepared GPU check: set up, run the CUDA-only tests, the GPU benchmarks and a short GPU
# pipeline, write every result under benchmarks/results/*-<gpu>.{md,json} (and $OUT when set), and
# print a summary table last. Sized for at most 8 minutes on one H100/H200-class GPU.
#
#   bash scripts/gpu-check.sh              # on a CUDA machine
#   bash scripts/gpu-check.sh --dry-run    # anywhere (CI runs it): tiny sizes on CPU, CUDA parts
#                                          # reported as skipped with the reason; results go to a
#                                          # temporary folder (or $OUT), never over the committed ones
#   PYTHON_BIN=/path/python bash scripts/gpu-check.sh   # use an interpreter that already has torch
#                                          # with CUDA (and the project's dependencies) instead of .venv
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
T0=$(date +%s)
SUMMARY=$(mktemp)
step() {  # step NAME TIMEOUT_S COMMAND...: run one part, record status, seconds and its last line
  local name=$1 limit=$2; shift 2
  local t log rc
  t=$(date +%s)
  log=$(mktemp)
  echo "== $name: $*"
  timeout "$limit" "$@" >"$log" 2>&1
  rc=$?
  tail -n 40 "$log"
  local status=ok
  [ $rc -eq 124 ] && status="timed out (${limit} s)"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="failed (rc $rc)"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t))" "$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-110)" >>"$SUMMARY"
  [ -n "${OUT:-}" ] && cp "$log" "$OUT/gpu-check-$name.log" 2>/dev/null
  rm -f "$log"
}
skip() { printf '%s\tskipped\t0\t%s\n' "$1" "$2" >>"$SUMMARY"; }

# 1. Set-up: the README's (.venv from scripts/setup.sh), or an interpreter given in PYTHON_BIN.
if [ -n "${PYTHON_BIN:-}" ]; then
  PY=$PYTHON_BIN
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  skip setup "PYTHON_BIN=$PY given"
else
  step setup 600 bash scripts/setup.sh
  PY=.venv/bin/python
fi
export PATH="$(dirname "$PY"):$PATH"
HAS_CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
GPU=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")' 2>/dev/null || echo none)
if [ "$DRY" = 0 ] && [ "$HAS_CUDA" != 1 ]; then
  echo "error: no CUDA device visible to $PY (torch.cuda.is_available() is false); use --dry-run on CPU" >&2
  exit 2
fi
RESULTS=benchmarks/results
if [ "$DRY" = 1 ]; then
  RESULTS=${OUT:-$(mktemp -d)}/results
  export CDSP_BENCH_RESULTS=$RESULTS
fi
mkdir -p "$RESULTS"
echo "GPU: $GPU; python: $PY; results: $RESULTS; dry run: $DRY"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# 2. CUDA-only tests (skipped, with their reason, without a GPU).
step cuda-tests 240 "$PY" -m pytest -m cuda tests/cuda -q -rs -p no:cacheprovider

# 3. Benchmarks: the training step (ours against the official-style step; bf16, channels_last, fused
# LoRM, torch.compile), LoRM's time and memory, the data loader against the measured step rate.
if [ "$DRY" = 1 ]; then
  step train-step 300 "$PY" benchmarks/train_step.py --device cpu --backbone resnet18 --crop 65 --batch 2 \
    --warmup 1 --repeat 1
  step lorm 200 "$PY" benchmarks/lorm.py --device cpu --sizes 9 --channels 64 --batch 1 --repeat 1
  step loader 120 "$PY" benchmarks/loader.py --crop 64 --seconds 1
else
  step train-step 330 "$PY" benchmarks/train_step.py --compile
  step lorm 150 "$PY" benchmarks/lorm.py --sizes 65 129 --channels 2048 --batch 16
  step loader 90 "$PY" benchmarks/loader.py --seconds 10
fi

# 4. A short pipeline (stage 1, pseudo-labels, stage 2, evaluation) through `cdsp run`.
DATA=$(mktemp -d)
TRAIN=64
[ "$DRY" = 1 ] && TRAIN=16
"$PY" -m service.cli data synth --root "$DATA/synth" --no-preview --size 65 --train $TRAIN --val 8 --classes 5 >/dev/null 2>&1
if [ "$DRY" = 1 ]; then
  step pipeline 300 "$PY" -m service.cli run configs/synthetic-demo.yaml --out "$DATA/run" --no-progress \
    --set "data.root=$DATA/synth" --set stage1.epochs=1 --set stage1.rounds=1 --set stage2.epochs=1 \
    --set stage1.batch_size=8 --set stage2.batch_size=8
else
  step pipeline 150 "$PY" -m service.cli run configs/synthetic-demo.yaml --out "$DATA/run" --no-progress \
    --set "data.root=$DATA/synth" --set resources.use_gpu=true --set stage1.epochs=4 --set stage2.epochs=8
fi
[ -f "$DATA/run/result.json" ] && cp "$DATA/run/result.json" "$RESULTS/gpu-check-pipeline-result.json"

# 5. The summary, last; also as a Markdown file beside the results.
TAG=$(echo "$GPU" | tr 'A-Z ' 'a-z-' | sed 's/^nvidia-//')
[ "$DRY" = 1 ] && TAG="$TAG-dry-run"
MD="$RESULTS/gpu-check-$TAG.md"
{
  echo "# GPU check ($GPU$([ "$DRY" = 1 ] && echo ', dry run on CPU'))"
  echo
  echo "Command: \`bash scripts/gpu-check.sh${1:+ $1}\`; $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git rev-parse --short HEAD 2>/dev/null); total $(($(date +%s) - T0)) s"
  echo
  echo "| part | status | seconds | last line |"
  echo "|---|---|---|---|"
  awk -F'\t' '{gsub(/\|/, "/", $4); printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}' "$SUMMARY"
} >"$MD"
[ -n "${OUT:-}" ] && [ "$RESULTS" != "$OUT/results" ] && cp "$RESULTS"/*.md "$RESULTS"/*.json "$OUT"/ 2>/dev/null
echo
cat "$MD"
grep -q $'\tfailed\|\ttimed out' "$SUMMARY" && exit 1
exit 0
