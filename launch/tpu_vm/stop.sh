#!/usr/bin/env bash
# Stops run RUN_NAME on every worker: SIGTERM to its process group, on which the trainer saves a checkpoint at
# the next step boundary and exits (run.sh resumes from it). FORCE=1 sends SIGKILL instead: for a run that
# hangs, e.g. workers waiting on a peer that has died. Caveat: each process decides on its own at which step
# it stops, so on a multi-host slice two workers may pick different steps and wait on each other; if the log
# stalls after "SIGTERM received", use FORCE=1 (the run resumes from the last periodic checkpoint).
#
#   launch/tpu_vm/stop.sh
#   FORCE=1 launch/tpu_vm/stop.sh
#   DRY_RUN=1 launch/tpu_vm/stop.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

case "${1:-}" in -h | --help) print_usage "$0"; exit 0 ;; esac
if [ "$#" -gt 0 ]; then
  print_usage "$0" >&2
  exit 2
fi
signal=TERM
if [ "${FORCE:-0}" = 1 ]; then signal=KILL; fi

tpu_ssh all "if [ -f $RUN_PIDFILE ]; then kill -$signal -- -\$(cat $RUN_PIDFILE) 2>/dev/null && echo \"\$(hostname): sent SIG$signal\" || echo \"\$(hostname): not running\"; fi"
