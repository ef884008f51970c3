#!/usr/bin/env bash
# Start a Ray worker node in the foreground and join the head at RAY_HEAD_ADDRESS (host:port).
#
# CDSP_GPUS_PER_WORKER=all (the default): this node owns every GPU the container sees; one
# worker container per machine, and Ray places one training worker per GPU.
#
# CDSP_GPUS_PER_WORKER=k: this node takes k GPUs for itself. `docker compose up --scale
# ray-worker=N` gives every replica the same devices (Docker's `count: N` always means GPUs
# 0..N-1), so the replicas share the machine's GPUs out among themselves: each takes an exclusive
# lock on the first free group of k under CDSP_GPU_CLAIMS (a volume all replicas mount) and
# exposes only that group through CUDA_VISIBLE_DEVICES. The lock is held by the Ray processes and
# the kernel drops it when the container stops, so a restarted replica gets a group back.
#
# Extra arguments are passed to `ray start`. CDSP_GPU_COUNT overrides the GPU count that
# nvidia-smi reports (for machines without it, and for tests).
set -euo pipefail

head_address="${RAY_HEAD_ADDRESS:?RAY_HEAD_ADDRESS (host:port of the Ray head GCS) is not set}"
per_worker="${CDSP_GPUS_PER_WORKER:-all}"
args=(--address="$head_address" --block)

if [[ "$per_worker" != "all" ]]; then
  if ! [[ "$per_worker" =~ ^[1-9][0-9]*$ ]]; then
    echo "CDSP_GPUS_PER_WORKER must be 'all' or a positive integer, not '$per_worker'" >&2
    exit 2
  fi
  claims="${CDSP_GPU_CLAIMS:-/home/ray/gpu-claims}"
  mkdir -p "$claims"
  if [[ -n "${CDSP_GPU_COUNT:-}" ]]; then
    total="$CDSP_GPU_COUNT"
  else
    total=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
  fi
  claimed=""
  for ((first = 0; first + per_worker <= total; first += per_worker)); do
    exec {lock_fd}>"$claims/gpus-$first-of-$per_worker.lock"
    if flock --nonblock "$lock_fd"; then
      claimed=$(seq -s, "$first" $((first + per_worker - 1)))
      break
    fi
    exec {lock_fd}>&-
  done
  if [[ -z "$claimed" ]]; then
    echo "no free group of $per_worker GPU(s) among $total: more replicas than the machine holds" >&2
    exit 3
  fi
  export CUDA_VISIBLE_DEVICES="$claimed"
  args+=(--num-gpus="$per_worker")
  echo "ray worker: GPUs $claimed of $total"
fi

exec ray start "${args[@]}" "$@"
