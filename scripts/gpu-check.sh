#!/usr/bin/env bash
# The one prepared GPU check: set up, run the CUDA-only tests, the GPU benchmarks and a short GPU
# pipeline, write every result under benchmarks/results/*-<gpu>.{md,json}, and print a summary table
# last. It ends inside GPU_CHECK_BUDGET seconds (default 480: the 8 minutes the check may take on one
# H100/H200-class GPU) whatever happens: a part that would start too late is reported as skipped.
#
#   bash scripts/gpu-check.sh              # on a CUDA machine
#   bash scripts/gpu-check.sh --only train-step,lorm   # some parts (cuda-tests, train-step, lorm,
#                                          # memory, pipeline, loader), sharing the whole budget; the set-up always runs
#   bash scripts/gpu-check.sh --dry-run    # anywhere (CI runs it): tiny sizes on CPU, CUDA parts
#                                          # reported as skipped with the reason; results go to a
#                                          # temporary folder (or $OUT), never over the committed ones
#   PYTHON_BIN=/path/python bash scripts/gpu-check.sh   # use an interpreter that already has torch
#                                          # with CUDA (and the project's dependencies) instead of .venv
# With a .gpu-pack/ folder (scripts/gpu-pack.py), the set-up is the pack on top of the machine's own
# python3 (BASE_PYTHON to name another): no package index needed. GPU_PACK=DIR names a pack (also
# for a --dry-run, which otherwise ignores .gpu-pack/). With OUT=DIR, DIR receives the summary and
# one gpu-check-<gpu>.tar.gz holding the result files this run wrote and each part's log.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0 ONLY="" ARGS="$*"
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --only) ONLY=${2:?--only needs a comma-separated list of parts}; shift ;;
    --only=*) ONLY=${1#--only=} ;;
    *) echo "error: unknown argument: $1 (expected --dry-run, --only PART[,PART...])" >&2; exit 2 ;;
  esac
  shift
done
PARTS="cuda-tests train-step lorm memory pipeline loader"
for part in ${ONLY//,/ }; do
  [[ " $PARTS " == *" $part "* ]] || { echo "error: --only: no part named '$part' (parts: $PARTS)" >&2; exit 2; }
done
T0=$(date +%s)
# The whole check ends inside this many seconds, summary included (the device tool stops a command
# at 600 s, and what a killed command printed last is lost): each part gets what is left.
BUDGET=${GPU_CHECK_BUDGET:-480}
SUMMARY=$(mktemp)
LOGS=$(mktemp -d)
STAMP=$(mktemp)  # result files newer than this one were written by this run
wanted() { [ "$1" = setup ] || [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }
left() { echo $((T0 + BUDGET - $(date +%s) - 20)); }  # seconds a part may still use (20 for the summary)
limit_of() {  # limit_of LIMIT_S: a part's time limit now; with --only, the chosen parts share what is left
  local left; left=$(left)
  if [ -n "$ONLY" ] || [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
step() {  # step NAME TIMEOUT_S MIN_S COMMAND...: run one part, record status, seconds and its last line
  # (MIN_S: with fewer seconds left than that, the part is reported as skipped rather than started
  # only to be cut off)
  local name=$1 limit=$2 min=$3; shift 3
  local t log rc left
  if ! wanted "$name"; then skip "$name" "not in --only $ONLY"; return; fi
  left=$(left)
  if [ "$left" -lt "$min" ]; then
    local how="rerun with --only $name"
    [ "$name" = setup ] && how="raise GPU_CHECK_BUDGET"
    skip "$name" "out of time: ${left} s left of GPU_CHECK_BUDGET=$BUDGET, it needs ${min}; $how"
    return
  fi
  limit=$(limit_of "$limit")
  t=$(date +%s)
  log=$LOGS/$name.log
  echo "== $name: $*"
  timeout "$limit" "$@" >"$log" 2>&1
  rc=$?
  tail -n 40 "$log"
  local status=ok
  [ $rc -eq 124 ] && status="timed out (${limit} s)"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="failed (rc $rc)"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t))" "$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-110)" >>"$SUMMARY"
}
skip() { printf '%s\tskipped\t0\t%s\n' "$1" "$2" >>"$SUMMARY"; }

# 1. Set-up. On a GPU machine with no package index (the lent H200: its python3 holds a CUDA torch,
# nothing can be fetched): the pack that `python3 scripts/gpu-pack.py` builds here, carried as
# .gpu-pack/, unpacked into a temporary folder behind the repository on PYTHONPATH. Or an interpreter
# given in PYTHON_BIN that has everything. Otherwise the README's (.venv from scripts/setup.sh).
if [ -n "${PYTHON_BIN:-}" ]; then
  PY=$PYTHON_BIN
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  skip setup "PYTHON_BIN=$PY given"
elif [ -n "${GPU_PACK:-}" ] || { [ "$DRY" = 0 ] && [ -d .gpu-pack ]; }; then
  PY=$(command -v "${BASE_PYTHON:-python3}") || { echo "error: no ${BASE_PYTHON:-python3} on PATH" >&2; exit 2; }
  SITE=${TMPDIR:-/tmp}/cdsp-gpu-site
  export PYTHONPATH="$PWD:$SITE"
  step setup 300 30 bash scripts/gpu-pack-install.sh "$PY" "${GPU_PACK:-.gpu-pack}" "$SITE"
else
  step setup 600 30 bash scripts/setup.sh
  PY=.venv/bin/python
fi
export PATH="$(dirname "$PY"):$PATH"
if grep -q $'^setup\tfailed\|^setup\ttimed out' "$SUMMARY"; then
  echo "error: the set-up failed (its output is above); nothing else was run" >&2
  cat "$SUMMARY" >&2
  [ -n "${OUT:-}" ] && mkdir -p "$OUT" && cp "$LOGS/setup.log" "$OUT/gpu-check-setup.log"
  exit 1
fi
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
# The Ray test's `cdsp run` gets the part's time less what the other tests and the prediction take.
CDSP_CUDA_RAY_TIMEOUT=$(($(limit_of 180) - 80))
export CDSP_CUDA_RAY_TIMEOUT=$((CDSP_CUDA_RAY_TIMEOUT < 60 ? 60 : CDSP_CUDA_RAY_TIMEOUT))
step cuda-tests 180 60 "$PY" -m pytest -m cuda tests/cuda -q -rs -p no:cacheprovider

# 3. Benchmarks: the training step (ours against the official-style step; bf16, channels_last, fused
# LoRM, torch.compile), LoRM's time and memory (both rewrite their result files after every
# configuration, so a part cut off by its limit keeps what it measured), and the memory of a step
# per image (activations kept for the backward pass, the step's peak allocation: deploy sizing).
if [ "$DRY" = 1 ]; then
  step train-step 300 30 "$PY" benchmarks/train_step.py --device cpu --backbone resnet18 --crop 65 --batch 2 \
    --warmup 1 --repeat 1
  step lorm 200 30 "$PY" benchmarks/lorm.py --device cpu --sizes 9 --channels 64 --batch 1 --repeat 1
  step memory 120 20 "$PY" benchmarks/activation_memory.py --device cpu --backbone resnet18 --crop 65 --batch 2
else
  # torch.compile (Inductor, Triton) builds its kernels' launchers with a C compiler and Python.h.
  COMPILE=--compile
  if ! command -v "${CC:-cc}" >/dev/null && ! command -v gcc >/dev/null; then
    COMPILE="" && skip compile "no C compiler on this machine: the ours+compile row is left out"
  elif ! "$PY" -c 'import os, sysconfig; raise SystemExit(not os.path.isfile(sysconfig.get_paths()["include"] + "/Python.h"))'; then
    COMPILE="" && skip compile "no Python.h for $PY: the ours+compile row is left out"
  fi
  step train-step 200 90 "$PY" benchmarks/train_step.py $COMPILE --repeat 10 --profile 2 --child-timeout 170
  step lorm 90 45 "$PY" benchmarks/lorm.py --sizes 65 129 --channels 2048 --batch 16 --repeat 5 --timeout 60
  step memory 60 20 "$PY" benchmarks/activation_memory.py --device cuda --batch 16
fi

# 4. A short pipeline (stage 1, pseudo-labels, stage 2, evaluation) through `cdsp run`.
DATA=$(mktemp -d)
TRAIN=64
[ "$DRY" = 1 ] && TRAIN=16
wanted pipeline && "$PY" -m service.cli data synth --root "$DATA/synth" --no-preview --size 65 --train $TRAIN --val 8 --classes 5 >/dev/null 2>&1
if [ "$DRY" = 1 ]; then
  step pipeline 300 30 "$PY" -m service.cli run configs/synthetic-demo.yaml --out "$DATA/run" --no-progress \
    --set "data.root=$DATA/synth" --set stage1.epochs=1 --set stage1.rounds=1 --set stage2.epochs=1 \
    --set stage1.batch_size=8 --set stage2.batch_size=8
else
  step pipeline 90 40 "$PY" -m service.cli run configs/synthetic-demo.yaml --out "$DATA/run" --no-progress \
    --set "data.root=$DATA/synth" --set resources.use_gpu=true --set stage1.epochs=4 --set stage2.epochs=8
fi
[ -f "$DATA/run/result.json" ] && cp "$DATA/run/result.json" "$RESULTS/gpu-check-pipeline-result.json"

# 5. The data loader against the step rate measured above (on a GPU machine: its host's cores,
# written as loader-<gpu>-host). Last: a CPU figure, measurable anywhere.
if [ "$DRY" = 1 ]; then
  step loader 120 20 "$PY" benchmarks/loader.py --crop 64 --seconds 1
else
  step loader 40 20 "$PY" benchmarks/loader.py --seconds 5
fi

# 6. The summary, last; also as a Markdown file beside the results. With $OUT: the summary and one
# gpu-check-<gpu>.tar.gz of the result files this run wrote and every part's log (the device tool
# returns at most 8 files).
TAG=$(echo "$GPU" | tr 'A-Z ' 'a-z-' | sed 's/^nvidia-//')
[ "$DRY" = 1 ] && TAG="$TAG-dry-run"
MD="$RESULTS/gpu-check-$TAG.md"
COMMIT=${GPU_CHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
{
  echo "# GPU check ($GPU$([ "$DRY" = 1 ] && echo ', dry run on CPU'))"
  echo
  echo "Command: \`bash scripts/gpu-check.sh${ARGS:+ $ARGS}\`; $(date -u '+%Y-%m-%d %H:%M UTC'); commit $COMMIT; total $(($(date +%s) - T0)) s of a $BUDGET s budget"
  echo
  echo "| part | status | seconds | last line |"
  echo "|---|---|---|---|"
  awk -F'\t' '{gsub(/\|/, "/", $4); printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}' "$SUMMARY"
} >"$MD"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$MD" "$OUT/" 2>/dev/null
  mkdir -p "$LOGS/results"
  find "$RESULTS" -maxdepth 1 -type f -newer "$STAMP" -exec cp {} "$LOGS/results/" \;
  tar -czf "$OUT/gpu-check-$TAG.tar.gz" -C "$LOGS" .
fi
echo
cat "$MD"
grep -q $'\tfailed\|\ttimed out' "$SUMMARY" && exit 1
exit 0
