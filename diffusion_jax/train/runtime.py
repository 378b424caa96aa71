"""Process-level setup shared by every mode: distributed init, logging, compilation cache, then dispatch."""
from __future__ import annotations

import logging as logging_std
import os

import jax
from absl import logging

from diffusion_jax.config import ConfigError, check_values, is_config_check, one_line
from diffusion_jax.train import workdir as workdir_lib


def initialize_distributed(config) -> None:
  """Multi-controller JAX: automatic on Cloud TPU VMs, explicit coordinator settings for GPU clusters."""
  dist = config.distributed
  if not dist.enabled:
    return
  if dist.local_device_count:  # CPU rehearsal of multi-host: fake devices per process, before backend use
    jax.config.update("jax_num_cpu_devices", int(dist.local_device_count))
  kwargs = {}
  if dist.coordinator_address:
    kwargs = dict(coordinator_address=dist.coordinator_address, num_processes=int(dist.num_processes),
                  process_id=int(dist.process_id))
  jax.distributed.initialize(**kwargs)


class _QuietLibraries(logging_std.Filter):
  """Orbax logs every file it writes at INFO; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname


CACHE_VARIABLE = "DIFFUSION_JAX_COMPILATION_CACHE"
CACHE_OFF = "off"


def compilation_cache_dir(setting: str = "") -> str:
  """The persistent XLA cache's folder: `setting` (train.compilation_cache_dir), else $DIFFUSION_JAX_COMPILATION_CACHE,
  else diffusion_jax/xla under the user's cache folder ($XDG_CACHE_HOME or ~/.cache); '' when either says 'off'."""
  chosen = setting or os.environ.get(CACHE_VARIABLE, "")
  if chosen == CACHE_OFF:
    return ""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.expanduser(chosen) if chosen else os.path.join(base, "diffusion_jax", "xla")


def use_compilation_cache(setting: str = "") -> None:
  """Turns on JAX's persistent compilation cache (see `compilation_cache_dir`): a restarted, resumed or finished run
  skips the XLA compiles (the train step, the sampler) it did before. JAX caches programs that took a second or more
  to compile."""
  cache_dir = compilation_cache_dir(setting)
  if cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
  logging.info("persistent compilation cache: %s", cache_dir or "off")


def run(config, workdir: str, mode: str):
  """Checks the config's values and the workdir, locks the workdir, builds the Trainer and runs `mode`."""
  from diffusion_jax.train.trainer import Trainer
  if mode not in ("train", "eval", "sample"):
    raise ConfigError(f"unknown mode {mode!r}")
  check_values(config)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  initialize_distributed(config)
  workdir_lib.prepare(workdir, need_checkpoint=mode != "train")
  use_compilation_cache(config.train.compilation_cache_dir)
  with workdir_lib.exclusive(workdir):
    if jax.process_index() == 0:
      with open(os.path.join(workdir, f"config_{mode}.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    logging.info("devices: %d (%s), processes: %d", jax.device_count(), jax.devices()[0].platform,
                 jax.process_count())
    try:
      trainer = Trainer(config, workdir)
    except ValueError as e:
      if isinstance(e, ConfigError) or not is_config_check(e):
        raise
      raise ConfigError(f"invalid model settings: {one_line(e)}") from e
    logging.info("mesh: %s", dict(trainer.mesh.shape))
    if mode == "train":
      return trainer.train()
    if mode == "eval":
      return trainer.evaluate()
    return trainer.sample()
