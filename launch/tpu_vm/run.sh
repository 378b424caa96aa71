#!/usr/bin/env bash
# Starts one training on every worker of the TPU VM: the same command everywhere, with
# --config.distributed.enabled=True (jax.distributed finds the other workers by itself on Cloud TPU) and
# --workdir $WORKDIR unless given. The processes are detached (they survive a closed laptop) and log to
# ~/$LOG_DIR/$RUN_NAME.log on each worker; then worker 0's log is streamed (FOLLOW=0: don't).
#
#   launch/tpu_vm/run.sh --config configs/mnist_ddpm.py [--config.key=value ...]
#   RUN_NAME=dit launch/tpu_vm/run.sh --config configs/x.py --workdir /gcs/my-bucket/runs/dit
#   DRY_RUN=1 launch/tpu_vm/run.sh --config configs/mnist_ddpm.py   # print the gcloud command only
#
# Run it again after a preemption or stop.sh: the trainer resumes from the newest checkpoint in the workdir.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

case "${1:-}" in -h | --help) print_usage "$0"; exit 0 ;; esac

config='' workdir=''
prev=''
for a in "$@"; do
  case "$prev" in --config) config=$a ;; --workdir) workdir=$a ;; esac
  case "$a" in --config=*) config=${a#--config=} ;; --workdir=*) workdir=${a#--workdir=} ;; esac
  prev=$a
done
if [ -z "$config" ]; then
  print_usage "$0" >&2
  echo "error: --config is required" >&2
  exit 2
fi
args=("$@")
if [ -z "$workdir" ]; then
  if [ -z "$WORKDIR" ]; then
    echo "error: no workdir: set BUCKET (setup.sh mounts it on every worker) or WORKDIR, or pass --workdir" >&2
    exit 2
  fi
  workdir=$WORKDIR
  args+=(--workdir "$workdir")
fi
case "$workdir" in
  gs://*)
    # The trainer writes its workdir through the local file system (open, os.makedirs, os.path.abspath): a
    # gs:// path would become a local folder named 'gs:' on each worker, and multi-host checkpoints would break.
    if [ "${ALLOW_GS_WORKDIR:-0}" != 1 ]; then
      echo "error: --workdir $workdir: the trainer does not write gs:// paths yet; use the Cloud Storage FUSE" \
           "mount setup.sh makes (BUCKET=b gives WORKDIR=/gcs/b/diffusion_jax/\$RUN_NAME), or set ALLOW_GS_WORKDIR=1" >&2
      exit 2
    fi ;;
  /*) ;;
  *)
    echo "error: --workdir $workdir: give an absolute path that every worker sees (a mounted bucket)" >&2
    exit 2 ;;
esac
args+=(--config.distributed.enabled=True)

python_cmd="$REMOTE_HOME/$VENV/bin/python -m diffusion_jax.main $(printf '%q ' "${args[@]}")"
remote="mkdir -p $REMOTE_HOME/$LOG_DIR"
remote+=" && if [ -f $RUN_PIDFILE ] && kill -0 \$(cat $RUN_PIDFILE) 2>/dev/null; then"
remote+=" echo \"\$(hostname): run $RUN_NAME is still running; launch/tpu_vm/stop.sh stops it\" >&2; exit 1; fi"
remote+=" && cd $REMOTE_HOME/$REMOTE_DIR"
# A per-worker persistent compilation cache: a resumed run skips recompiling.
remote+=" && (DIFFUSION_JAX_COMPILATION_CACHE=$REMOTE_HOME/.cache/diffusion_jax_xla"
remote+=" nohup setsid ${python_cmd}> $RUN_LOG 2>&1 < /dev/null & echo \$! > $RUN_PIDFILE)"
tpu_ssh all "$remote"

if [ "${FOLLOW:-1}" = 1 ] && [ "${DRY_RUN:-0}" != 1 ]; then
  exec "$(dirname "${BASH_SOURCE[0]}")/logs.sh" 0
fi
