# shellcheck shell=bash disable=SC2034  # the variables are used by the scripts that source this file
# Settings shared by the Cloud TPU VM scripts in this folder. Sourced, not run. Every value can be overridden
# from the environment, e.g. `ACCELERATOR_TYPE=v5p-32 TPU_NAME=pod launch/tpu_vm/create.sh`.

PROJECT=${PROJECT:-}                          # empty: gcloud's configured project
ZONE=${ZONE:-us-east5-a}
TPU_NAME=${TPU_NAME:-diffusion-jax-${USER:-user}}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5p-8}   # v5p-8 / v6e-8 / v4-8: one host; v5p-16, v6e-16, v4-32, ...: a pod slice
# TPU VM software (runtime) version for JAX: the base images Google lists per generation.
if [ -z "${RUNTIME_VERSION:-}" ]; then
  case "$ACCELERATOR_TYPE" in
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
  esac
fi
SPOT=${SPOT:-0}                               # 1: a Spot TPU (cheaper, preemptible; the trainer resumes)

# Storage. Every worker writes its shards of each Orbax checkpoint and reads them back, so WORKDIR must be one
# shared directory seen by all workers under the same path. setup.sh mounts BUCKET there with Cloud Storage
# FUSE (use a bucket with hierarchical namespace: Orbax commits a checkpoint by renaming its directory).
BUCKET=${BUCKET:-}                            # e.g. my-bucket (no gs://)
MOUNT_POINT=${MOUNT_POINT:-${BUCKET:+/gcs/$BUCKET}}
RUN_NAME=${RUN_NAME:-mnist_ddpm}
WORKDIR=${WORKDIR:-${MOUNT_POINT:+$MOUNT_POINT/diffusion_jax/$RUN_NAME}}

# Code. REPO empty: copy this checkout (tracked and untracked, not ignored, files); else `git clone REPO`
# at REPO_REF on every worker.
REPO=${REPO:-}
REPO_REF=${REPO_REF:-main}
REMOTE_DIR=${REMOTE_DIR:-diffusion_jax}       # on each worker, relative to the home directory
VENV=${VENV:-diffusion_jax_venv}              # likewise
LOG_DIR=${LOG_DIR:-diffusion_jax_logs}        # likewise; one log (and pid file) per run and worker

# On the workers: $HOME is expanded there, not here.
# shellcheck disable=SC2016
REMOTE_HOME='$HOME'
RUN_LOG=$REMOTE_HOME/$LOG_DIR/$RUN_NAME.log
RUN_PIDFILE=$REMOTE_HOME/$LOG_DIR/$RUN_NAME.pid

_LAUNCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# The JAX release setup.py pins; jax[tpu] of the same version brings the matching libtpu.
if [ -z "${JAX_VERSION:-}" ]; then
  JAX_VERSION=$(sed -n 's/^ *"jax==\([0-9.]*\)".*/\1/p' "$_LAUNCH_ROOT/setup.py" 2>/dev/null | head -n 1 || true)
  JAX_VERSION=${JAX_VERSION:-0.10.2}
fi

# ---------------------------------------------------------------------------------------------- helpers
# shellcheck source-path=SCRIPTDIR source=../lib.sh
source "$_LAUNCH_ROOT/launch/lib.sh"

gcloud_tpu() {  # gcloud compute tpus tpu-vm SUBCOMMAND ... with the zone and project settled here
  local sub=$1
  shift
  local flags=("--zone=$ZONE")
  if [ -n "$PROJECT" ]; then flags+=("--project=$PROJECT"); fi
  run_cmd gcloud compute tpus tpu-vm "$sub" "$@" "${flags[@]}"
}

# Runs a shell command on WORKER (a number or `all`) of the TPU VM.
tpu_ssh() {
  local worker=$1 command=$2
  gcloud_tpu ssh "$TPU_NAME" "--worker=$worker" "--command=$command"
}
