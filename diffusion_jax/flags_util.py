"""Flag parsing shared by the command-line entry points (`diffusion_jax.main`, `diffusion_jax.plan`).

Both take `--config path.py[:arg]` with `--config.key=value` overrides, and both promise that bad input is one
`error: ...` line on stderr and exit code 2, never a traceback: the rules for that live here, once.
"""
from __future__ import annotations

import sys
from typing import NoReturn, Sequence

from absl import flags
from ml_collections import config_flags

from diffusion_jax.config import ConfigError, load_config, one_line


def usage_error(message, code: int = 2) -> NoReturn:
  """One `error: ...` line on stderr and exit `code` (2: the user's input; 1: a run that failed, e.g. NaN)."""
  print(f"error: {one_line(message)}", file=sys.stderr)
  sys.exit(code)


class _ConfigFileParser(flags.ArgumentParser):
  """Loads `--config` with `diffusion_jax.config.load_config`, in place of ml_collections' own loader.

  ml_collections defers a missing file to the first use of the config (then a traceback) and folds other errors'
  tracebacks into the flag's message; `load_config` raises one-line ConfigErrors, and loads a config from any
  working directory and any location, its siblings included.
  """

  def parse(self, path):
    config = load_config(path)
    config.lock()  # as ml_collections does: an override of a key the config lacks is an error, not a new key
    return config

  def flag_type(self):
    return "config object"


def define_config_flag() -> flags.FlagHolder:
  """`--config path.py[:arg]` with `--config.key=value` overrides."""
  holder = config_flags.DEFINE_config_file("config", None, "Path to a config file, optionally `path.py:arg`.")
  flags.FLAGS["config"].parser = _ConfigFileParser()
  return holder


def _unknown_key_message(argv: Sequence[str], missing: str) -> str:
  """ml_collections names only the last part of an unknown key; find the full override that used it."""
  for arg in argv[1:]:
    key = arg.split("=", 1)[0].lstrip("-")
    if key.startswith("config.") and missing in key.split("."):
      return f"unknown config key '{key.removeprefix('config.')}' (--{key})"
  return f"unknown config key '{missing}'"


def _config_error(error: BaseException) -> ConfigError | None:
  """The ConfigError absl wrapped (twice) into an IllegalFlagValueError, if there is one."""
  while error is not None:
    if isinstance(error, ConfigError):
      return error
    error = error.__cause__ or error.__context__
  return None


def parse_flags(argv: Sequence[str]) -> list[str]:
  """`flags.FLAGS(argv)`, with every parse failure (unknown flag or config key, bad value) a `usage_error`."""
  try:
    return flags.FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    name = e.flagname
    kind = "config key" if name.startswith("config.") else "flag"
    usage_error(f"unknown {kind} '{name.removeprefix('config.')}' (--{name})")
  except flags.Error as e:
    usage_error(_config_error(e) or e)
  except (AttributeError, KeyError) as e:
    usage_error(_unknown_key_message(argv, str(e).strip("'\" ")))
  except (TypeError, ValueError) as e:
    usage_error(e)
