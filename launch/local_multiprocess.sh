#!/usr/bin/env bash
# Runs the same diffusion_jax command as N local JAX processes talking over loopback (CPU collectives, gloo),
# each with D fake CPU devices: a rehearsal, on one machine, of what a multi-host TPU/GPU job does.
#
#   launch/local_multiprocess.sh 2 4 --config configs/mnist_ddpm.py:tiny --workdir /tmp/mp
#   DRY_RUN=1 launch/local_multiprocess.sh 2 4 --config ...      # print the commands only
#
# Process 0 logs to the console; process i>0 to $LOG_DIR/process_i.log. If any process fails, the others get
# SIGTERM (the trainer checkpoints at the next step boundary) and, STOP_GRACE_S later, SIGKILL: a process left
# waiting in a collective for a dead peer never reaches that boundary. The exit status is the first failure's.
#
# Environment: PORT (coordinator port; default: a free one), LOG_DIR (default /tmp/diffusion_jax_logs),
# PYTHON (default python), STOP_GRACE_S (default 10), DRY_RUN=1.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  print_usage "$0"
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS --config CONFIG --workdir DIR [--config.key=value ...]"
}

if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
  usage
  exit 0
fi
if [ "$#" -lt 3 ]; then
  usage >&2
  exit 2
fi
NUM_PROCESSES=$1
DEVICES=$2
shift 2
if ! [[ $NUM_PROCESSES =~ ^[1-9][0-9]*$ && $DEVICES =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NUM_PROCESSES and DEVICES_PER_PROCESS must be positive integers, got '$NUM_PROCESSES' '$DEVICES'" >&2
  exit 2
fi
PYTHON=${PYTHON:-python}
LOG_DIR=${LOG_DIR:-/tmp/diffusion_jax_logs}
if [ -z "${PORT:-}" ]; then
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' \
         2>/dev/null || echo $((20000 + RANDOM % 20000)))
fi

STOP_GRACE_S=${STOP_GRACE_S:-10}

pids=()
alive() {
  local pid
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      return 0
    fi
  done
  return 1
}
stop_all() {
  local pid t
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for ((t = 0; t < STOP_GRACE_S * 10; t++)); do
    alive || return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  cmd=("$PYTHON" -m diffusion_jax.main "$@"
       --config.distributed.enabled=True
       "--config.distributed.coordinator_address=127.0.0.1:${PORT}"
       "--config.distributed.num_processes=${NUM_PROCESSES}"
       "--config.distributed.process_id=${i}"
       "--config.distributed.local_device_count=${DEVICES}")
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "JAX_PLATFORMS=cpu ${cmd[*]}"
    continue
  fi
  mkdir -p "$LOG_DIR"
  if [ "$i" -eq 0 ]; then
    JAX_PLATFORMS=cpu "${cmd[@]}" &
  else
    JAX_PLATFORMS=cpu "${cmd[@]}" >"$LOG_DIR/process_${i}.log" 2>&1 &
  fi
  pids+=("$!")
done

status=0
for _ in "${pids[@]}"; do
  rc=0
  wait -n || rc=$?
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$rc
    echo "a process exited with status $rc; stopping the others (logs: $LOG_DIR)" >&2
    stop_all
  fi
done
exit "$status"
