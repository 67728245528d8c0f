#!/usr/bin/env bash
# Start N processes of one multi-process JAX job on this machine (for testing).
#
#   scripts/launch_local_multihost.sh N DEVICES_PER_PROCESS COMMAND [ARGS...]
#
# e.g. scripts/launch_local_multihost.sh 2 2 python explain.py --config configs/audit.py:smoke \
#          --workdir runs/audit2 --multihost
#
# Each process gets JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port),
# JAX_NUM_PROCESSES, JAX_PROCESS_ID and XLA_FLAGS with DEVICES_PER_PROCESS
# emulated CPU devices (appended to the caller's XLA_FLAGS, so it wins over
# a device count there); faceaudit_jax.distributed.initialize reads them (and
# selects gloo for the CPU collectives). Output of process i is prefixed with
# [i]. The script exits with the first non-zero status, and stops the other
# processes when one fails (as a cluster scheduler would): SIGTERM, then
# SIGKILL 3 s later for those still running (JAX takes SIGTERM as a preemption
# notice and does not stop).
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS COMMAND [ARGS...]" >&2
  exit 2
fi
num_processes=$1; devices=$2; shift 2
if ! [[ $num_processes =~ ^[1-9][0-9]*$ && $devices =~ ^[1-9][0-9]*$ ]]; then
  echo "NUM_PROCESSES=$num_processes DEVICES_PER_PROCESS=$devices: expected positive integers" >&2
  exit 2
fi
port=${MULTIHOST_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
here=$(cd "$(dirname "$0")/.." && pwd)
pids=()
cleanup() {
  local alive=() pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null && alive+=("$pid"); done
  # JAX takes SIGTERM for a preemption notice and keeps running: SIGKILL after a grace period.
  if ((${#alive[@]})); then
    sleep 3
    for pid in "${alive[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  fi
}
trap cleanup EXIT
for ((i = 0; i < num_processes; i++)); do
  (
    export JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$num_processes \
      JAX_PROCESS_ID=$i JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} \
      XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices" \
      PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
    exec "$@" > >(sed -u "s/^/[$i] /") 2>&1
  ) &
  pids+=($!)
done
status=0
# Reap processes as they end (wait -n), so a failure stops the others at once.
for ((left = num_processes; left > 0; left--)); do
  code=0
  wait -n || code=$?
  if [[ $code -ne 0 && $status -eq 0 ]]; then
    status=$code
    cleanup
  fi
done
trap - EXIT
exit $status
