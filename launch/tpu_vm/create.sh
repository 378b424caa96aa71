#!/usr/bin/env bash
# Creates the Cloud TPU VM named in env.sh: one host (v5p-8, v6e-8, v4-8) or a multi-host pod slice (v5p-16, ...).
#
#   launch/tpu_vm/create.sh                                  # TPU_NAME, ACCELERATOR_TYPE, RUNTIME_VERSION, ZONE
#   ACCELERATOR_TYPE=v5p-32 SPOT=1 launch/tpu_vm/create.sh   # a 4-host v5p slice as a Spot TPU
#   launch/tpu_vm/create.sh --reserved                       # extra arguments go to `gcloud ... create`
#   DRY_RUN=1 launch/tpu_vm/create.sh                        # print the gcloud command only
#
# Next: launch/tpu_vm/setup.sh, then launch/tpu_vm/run.sh.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

case "${1:-}" in -h | --help) print_usage "$0"; exit 0 ;; esac

flags=("--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION")
if [ "$SPOT" = 1 ]; then flags+=(--spot); fi
gcloud_tpu create "$TPU_NAME" "${flags[@]}" "$@"
