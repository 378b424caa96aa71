#!/usr/bin/env bash
# Streams the log of run RUN_NAME: worker 0's (process 0: metrics and progress), worker N's, or every
# worker's, each line prefixed with "[worker N]". Ctrl-C stops the stream, not the run.
#
#   launch/tpu_vm/logs.sh          # worker 0
#   launch/tpu_vm/logs.sh 3        # worker 3
#   launch/tpu_vm/logs.sh all      # all workers, prefixed
#   LOG_LINES=500 launch/tpu_vm/logs.sh # start with the last 500 lines (default 100)
#   DRY_RUN=1 launch/tpu_vm/logs.sh all
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

case "${1:-}" in -h | --help) print_usage "$0"; exit 0 ;; esac
worker=${1:-0}
if ! [[ $worker =~ ^([0-9]+|all)$ ]] || [ "$#" -gt 1 ]; then
  print_usage "$0" >&2
  exit 2
fi
lines=${LOG_LINES:-100}  # not LINES: shells set that to the terminal height

if [ "$worker" = all ]; then
  # The worker number from the TPU VM metadata server (the one jax.distributed uses), else the host name.
  # shellcheck disable=SC2016  # expanded on the worker
  id='$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)'
  # shellcheck disable=SC2016
  tpu_ssh all "w=$id; tail -n $lines -F $RUN_LOG | sed -u \"s/^/[worker \$w] /\""
else
  tpu_ssh "$worker" "tail -n $lines -F $RUN_LOG"
fi
