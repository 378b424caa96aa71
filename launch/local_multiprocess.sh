#!/usr/bin/env bash
# Runs the same diffusion_jax command as N local JAX processes talking over loopback (CPU collectives),
# each with D fake CPU devices: a rehearsal, on one machine, of what a multi-host TPU/GPU job does.
#
#   launch/local_multiprocess.sh 2 4 --config configs/mnist_ddpm.py:tiny --workdir /tmp/mp
#   DRY_RUN=1 launch/local_multiprocess.sh 2 4 --config ...      # print the commands only
#
# Process 0 logs to the console; process i>0 to $LOG_DIR/process_i.log.
set -euo pipefail

if [ "$#" -lt 3 ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS --config CONFIG --workdir DIR [--config.key=value ...]" >&2
  exit 2
fi
NUM_PROCESSES=$1
DEVICES=$2
shift 2
PORT=${PORT:-$((20000 + RANDOM % 20000))}
LOG_DIR=${LOG_DIR:-/tmp/diffusion_jax_logs}
PYTHON=${PYTHON:-python}

pids=()
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
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
