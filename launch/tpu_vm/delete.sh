#!/usr/bin/env bash
# Deletes the Cloud TPU VM named in env.sh (all its workers and their local disks; the bucket is untouched).
#
#   launch/tpu_vm/delete.sh             # gcloud asks for confirmation
#   launch/tpu_vm/delete.sh --quiet     # extra arguments go to `gcloud ... delete`
#   DRY_RUN=1 launch/tpu_vm/delete.sh   # print the gcloud command only
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

case "${1:-}" in -h | --help) print_usage "$0"; exit 0 ;; esac

gcloud_tpu delete "$TPU_NAME" "$@"
