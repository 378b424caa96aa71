"""Config files and the user-facing errors about them.

Configs are `get_config(arg)` files returning a locked `ml_collections.ConfigDict`. Anything a user can get wrong in
a config (a missing or broken file, an unknown argument, key or type, a value out of range) surfaces as a
`ConfigError`, which the command line prints as one line on stderr with exit code 2.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.machinery
import importlib.util
import os
import re
import sys
import traceback
import types

import ml_collections


class ConfigError(ValueError):
  """A user-facing configuration problem; its message is one line."""


def one_line(message) -> str:
  """A message (or exception) as one line, with every character the user typed kept."""
  if isinstance(message, KeyError) and message.args:
    message = message.args[0]  # str(KeyError) adds quotes around its message
  # ml_collections puts the whole config in its messages; keep the first sentence. An error raised while JAX traces
  # (a model built under eval_shape) carries JAX's note on filtered frames: not the user's business.
  message = re.split(r"\s*Other fields present", str(message))[0]
  message = re.split(r"\s*-{20}\s*For simplicity, JAX has removed", message)[0]
  return " ".join(message.split())


def compute_dtype(name: str):
  """`model.compute_dtype` as a dtype for the models' `dtype` fields: None ('' or 'float32') computes in float32."""
  import jax.numpy as jnp
  if name in ("", "float32", None):
    return None
  try:
    return jnp.dtype(name)
  except TypeError:
    raise ConfigError(f"model.compute_dtype={name!r} is not a dtype (e.g. 'float32', 'bfloat16')") from None


# ---------------------------------------------------------------------------------------------------- loading
def _folder_package(folder: str) -> str:
  """A package whose `__path__` is the config's folder, so configs import siblings with `from . import name`.

  The name is derived from the folder, not from `sys.path`, so a config loads the same from any working directory
  and any location, and a `configs/` folder of another project on the path cannot shadow its siblings. The folder's
  `__init__.py`, if any, is not run: a config folder is a set of files, not a library.
  """
  name = "_diffusion_jax_configs_" + hashlib.sha1(folder.encode()).hexdigest()[:12]
  if name not in sys.modules:
    package = types.ModuleType(name, f"config files in {folder}")
    package.__path__ = [folder]
    package.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    package.__spec__.submodule_search_locations = [folder]
    sys.modules[name] = package
  return name


def _where(path: str, shown: str, error: BaseException) -> str:
  """'file.py line N' of the deepest frame inside the config file, for errors raised by the user's own code."""
  lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
           if os.path.abspath(frame.filename) == path]
  return f"{shown} line {lines[-1]}" if lines else shown


def _describe(error: BaseException) -> str:
  # ValueErrors are the config's own messages ("unknown config argument ..."); anything else is a bug in the
  # file, and its type is half the message (NameError, ImportError, ...).
  if isinstance(error, ValueError):
    return one_line(error)
  message = f"{type(error).__name__}: {one_line(error)}"
  if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] == "configs":
    message += (" (config files import the shared defaults with `from diffusion_jax.defaults import base_config` "
                "and configs in their own folder with `from . import name`)")
  return message


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`path.py` or `path.py:arg` -> `get_config()` or `get_config(arg)` of that file; every failure a ConfigError."""
  shown, *arg = spec.split(":", 1)  # messages name the file as the user wrote it
  if not shown:
    raise ConfigError("--config is empty; give a config file, e.g. --config configs/mnist_ddpm.py")
  path = os.path.abspath(os.path.expanduser(shown))
  if os.path.isdir(path):
    raise ConfigError(f"--config {shown} is a folder; give a config file in it, e.g. {os.path.join(shown, 'name.py')}")
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {shown}")
  folder, filename = os.path.split(path)
  name = f"{_folder_package(folder)}.{os.path.splitext(filename)[0]}"
  module_spec = importlib.util.spec_from_loader(name, importlib.machinery.SourceFileLoader(name, path))
  module = importlib.util.module_from_spec(module_spec)
  sys.modules[name] = module  # before running it: a sibling the file imports may import it back
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    sys.modules.pop(name, None)
    raise ConfigError(f"{shown} line {e.lineno}: syntax error: {e.msg}") from None
  except Exception as e:  # the user's file: any failure is theirs to fix, described in one line
    sys.modules.pop(name, None)
    raise ConfigError(f"{_where(path, shown, e)}: cannot load: {_describe(e)}") from e
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"{shown} has no get_config() function")
  try:
    config = module.get_config(*arg)
  except Exception as e:
    raise ConfigError(f"{spec}: {_describe(e)}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{spec}: get_config() returned {type(config).__name__}, not an ml_collections.ConfigDict")
  return config


# ---------------------------------------------------------------------------------------------------- values
# Counts and sizes every task reads the same way. A value below its minimum fails much later otherwise, inside the
# data pipeline, a modulo in the loop or a jitted sampler, as a traceback (batch_size=0, per_prompt=0). The
# minimum 0 means "off" (eval_every) or "in-process" (num_workers). Keys a config does not have are not checked.
MINIMUMS = {
    "train.steps": 0, "train.batch_size": 1, "train.grad_accum_steps": 1, "train.log_every": 1,
    "train.checkpoint_every": 1, "train.keep_checkpoints": 1, "train.eval_every": 0, "train.sample_every": 0,
    "data.image_size": 1, "data.channels": 1, "data.max_text_len": 1, "data.num_workers": 0,
    "sample.per_prompt": 1, "sample.batch_size": 1, "sample.num_steps": 1, "sample.height": 0, "sample.width": 0,
    "evals.*.batch_size": 0, "evals.*.every": -1,  # every evaluator (0: train.batch_size; -1: never)
}


def check_values(config) -> None:
  """Raises a ConfigError naming the first field of `MINIMUMS` whose value is below its minimum."""
  for pattern, minimum in MINIMUMS.items():
    section, *middle, field = pattern.split(".")
    nodes = [(section, config.get(section))]
    if middle:  # 'evals.*.batch_size': that field of every entry
      nodes = [(f"{section}.{name}", entry) for name, entry in (config.get(section) or {}).items()]
    for where, node in nodes:
      if node is None or field not in node:
        continue
      value = node[field]
      if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}.{field} must be an integer >= {minimum}, got {value!r}")


# Where model configs check their own fields: the dataclass's `__post_init__`, or a `validate()` method the model
# calls when it is built (`UNetConfig`).
_CONFIG_CHECKS = ("__post_init__", "validate")


def is_config_check(error: BaseException) -> bool:
  """Whether `error` was raised by a dataclass checking its own fields, i.e. a model config rejecting a value.

  Model configs (`UNetConfig`, `DiTConfig`, ...) check their fields in `__post_init__` or `validate()`; when a task
  builds one from the user's config, such a ValueError is the user's to fix (a `block_out_channels` of another
  length than `attention_levels`) and is reported as a ConfigError. Every other ValueError keeps its traceback: it
  is a bug to report, not a setting to change.
  """
  tb = error.__traceback__
  while tb is not None:
    frame = tb.tb_frame
    if frame.f_code.co_name in _CONFIG_CHECKS and dataclasses.is_dataclass(frame.f_locals.get("self")):
      return True
    tb = tb.tb_next
  return False
