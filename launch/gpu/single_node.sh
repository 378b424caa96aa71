#!/usr/bin/env bash
# Trains on one machine with N GPUs: a single JAX process owning all of them (no jax.distributed needed; the
# mesh spans every local GPU). JAX_PLATFORMS=cuda makes a missing CUDA build of jaxlib an error instead of a
# silent CPU run: install it with `pip install "jax[cuda12]==<the jax version setup.py pins>"`.
#
#   launch/gpu/single_node.sh --config configs/mnist_ddpm.py --workdir /tmp/run [--config.key=value ...]
#   GPUS=0,1 launch/gpu/single_node.sh ...      # only these GPUs (CUDA_VISIBLE_DEVICES)
#   DRY_RUN=1 launch/gpu/single_node.sh ...     # print the command only
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

case "${1:-}" in -h | --help) print_usage "$0"; exit 0 ;; esac
if [ "$#" -lt 2 ]; then
  print_usage "$0" >&2
  exit 2
fi

env_vars=(JAX_PLATFORMS=cuda)
if [ -n "${GPUS:-}" ]; then env_vars+=("CUDA_VISIBLE_DEVICES=$GPUS"); fi
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
run_cmd env "${env_vars[@]}" "${PYTHON:-python}" -m diffusion_jax.main "$@"
