#!/usr/bin/env bash
# Unpack the pack of scripts/gpu-pack.py for an interpreter (scripts/gpu-check.sh's set-up on a GPU
# machine with no package index), then show that the project imports from it and what, if anything,
# the machine's own packages leave unmet.
#
#   bash scripts/gpu-pack-install.sh PYTHON PACK_DIR SITE_DIR     # then: PYTHONPATH=REPO:SITE_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 3 ] || { echo "usage: $0 PYTHON PACK_DIR SITE_DIR" >&2; exit 2; }
py=$1 pack=$2 site=$3
shopt -s nullglob
tarballs=("$pack"/site-py*.tar.xz)
[ ${#tarballs[@]} -eq 1 ] || { echo "error: $pack: expected one site-pyNNN.tar.xz, found ${#tarballs[@]}" >&2; exit 2; }
want=$(basename "${tarballs[0]}" .tar.xz)
want=${want#site-py}
have=$("$py" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
if [ "$want" != "$have" ]; then
  echo "error: ${tarballs[0]} is for Python ${want:0:1}.${want:1}, but $py is ${have:0:1}.${have:1}:" \
    "rebuild it with python3 scripts/gpu-pack.py --python-version ${have:0:1}.${have:1}" >&2
  exit 2
fi
rm -rf "$site"
mkdir -p "$site"
tar -xJf "${tarballs[0]}" -C "$site" --strip-components=1
echo "unpacked ${tarballs[0]} ($(du -sm "$site" | cut -f1) MB) into $site"
export PYTHONPATH="$PWD:$site"
# Requirements of the carried packages that the machine's own versions do not meet (pip check sees
# the folder through PYTHONPATH); a note to act on if a later part fails, not an error by itself.
# Names match whatever their spelling (case, and - _ . alike); pip's lines are shown as it wrote them.
carried=$(tail -n +2 "$pack/MANIFEST.txt" | cut -d= -f1 | sed 's/[-_.]/[-_.]/g' | paste -sd'|')
"$py" -m pip check 2>/dev/null | grep -i -E "^($carried) " | sed 's/^/pip check: /' || true
"$py" -c '
import ray, torch
import cdsp_core, service.cli, workers.train  # noqa: F401
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, available {torch.cuda.is_available()}),"
      f" ray {ray.__version__} from {ray.__file__}")
'
