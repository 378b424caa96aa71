"""`python -m diffusion_jax.main --config configs/<name>.py[:arg] --workdir DIR [--mode train|eval|sample]`.

Parses flags, loads the config, sets up the runtime and hands off to the trainer. User errors (bad config
keys or types, missing data, missing checkpoints) are one line on stderr and exit code 2.

`--mode sample --pretrained FOLDER` samples from a diffusers Stable Diffusion folder instead of a trained run
(`diffusion_jax.sample_pretrained`, whose sampling config is the default `--config` there).
"""
from diffusion_jax import allocator

if __name__ == "__main__":
  allocator.reexec_with_tcmalloc()  # before anything else: the command starts over with a faster malloc

from absl import app, flags  # noqa: E402

from diffusion_jax.flags_util import define_config_flag, parse_flags, usage_error  # noqa: E402

_MODES = ("train", "eval", "sample")
_CONFIG = define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and samples are written.")
_MODE = flags.DEFINE_enum("mode", "train", _MODES, "train (with periodic eval/sample), eval or sample.")
_PRETRAINED = flags.DEFINE_string("pretrained", None, "A diffusers Stable Diffusion folder to sample from "
                                  "(--mode sample); the config defaults to diffusion_jax/sample_pretrained.py.")


def _with_default_config(argv):
  """`--pretrained` without `--config` samples with the default sampling config (so `--config.sample.*` works)."""
  names = [a.split("=", 1)[0] for a in argv[1:]]
  if "--pretrained" in names and "--config" not in names:
    from diffusion_jax import sample_pretrained
    return argv[:1] + [f"--config={sample_pretrained.__file__}"] + argv[1:]
  return argv


def _parse_flags(argv):
  rest = parse_flags(_with_default_config(argv))
  if _CONFIG.value is None:
    usage_error("--config is required, e.g. --config configs/mnist_ddpm.py")
  if not _WORKDIR.value:
    usage_error("--workdir is required")
  return rest


def _sample_pretrained() -> None:
  from diffusion_jax import sample_pretrained
  from diffusion_jax.config import ConfigError
  if flags.FLAGS["mode"].present and _MODE.value != "sample":
    usage_error(f"--pretrained samples from a pretrained folder: use --mode sample, not --mode {_MODE.value}")
  try:
    sample_pretrained.run(_CONFIG.value, _PRETRAINED.value, _WORKDIR.value)
  except ConfigError as e:
    usage_error(e)


def main(argv):
  del argv
  from absl import logging
  from diffusion_jax import xla_cpu
  logging.info("allocator: %s; CPU convolutions: %s", allocator.in_use(), xla_cpu.in_use())
  from diffusion_jax.config import ConfigError
  from diffusion_jax.data.records import DataError
  from diffusion_jax.sample_pretrained import TASK as PRETRAINED_SAMPLING
  from diffusion_jax.train import runtime
  from diffusion_jax.train.trainer import NonFiniteError
  if _PRETRAINED.value:
    return _sample_pretrained()
  if _CONFIG.value.get("task") == PRETRAINED_SAMPLING:
    usage_error("this config samples from a pretrained folder: give --pretrained FOLDER --mode sample")
  try:
    runtime.run(_CONFIG.value, _WORKDIR.value, _MODE.value)
  except (ConfigError, DataError, FileNotFoundError) as e:
    usage_error(e)
  except NonFiniteError as e:  # the run itself failed; its last good checkpoint is kept and named
    usage_error(e, code=1)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
