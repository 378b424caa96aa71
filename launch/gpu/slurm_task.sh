#!/usr/bin/env bash
# One SLURM task of launch/gpu/slurm_multinode.sbatch: runs the given command with this task's process id
# (--config.distributed.process_id=$SLURM_PROCID appended) and every GPU of the node visible to JAX.
#
#   slurm_task.sh python -m diffusion_jax.main --config ... --config.distributed.coordinator_address=... ...
#
# JAX_LOCAL_DEVICE_IDS is the point: jax.distributed.initialize() under srun detects SLURM and, unless told
# the local devices, limits each process to GPU number SLURM_LOCALID (one process per GPU) — with one task
# per node that is GPU 0 alone. The GPU count comes from CUDA_VISIBLE_DEVICES (set by SLURM's GPU binding),
# else SLURM_GPUS_ON_NODE, else nvidia-smi.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

case "${1:-}" in -h | --help) print_usage "$0"; exit 0 ;; esac
if [ "$#" -eq 0 ]; then
  print_usage "$0" >&2
  exit 2
fi
if [ -z "${SLURM_PROCID:-}" ]; then
  echo "error: SLURM_PROCID is not set: this runs inside srun (see launch/gpu/slurm_multinode.sbatch)" >&2
  exit 2
fi

if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  IFS=, read -ra visible <<<"$CUDA_VISIBLE_DEVICES"
  num_gpus=${#visible[@]}
elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
  num_gpus=$SLURM_GPUS_ON_NODE
else
  num_gpus=$(nvidia-smi --list-gpus | wc -l)
fi
if [ "$num_gpus" -lt 1 ]; then
  echo "error: no GPU visible on $(hostname)" >&2
  exit 2
fi
JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((num_gpus - 1)))
export JAX_LOCAL_DEVICE_IDS
exec "$@" "--config.distributed.process_id=$SLURM_PROCID"
