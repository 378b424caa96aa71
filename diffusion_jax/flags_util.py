"""Flag parsing shared by the command-line entry points (`diffusion_jax.main`, `diffusion_jax.plan`).

Both take `--config path.py[:arg]` with `--config.key=value` overrides, and both promise that bad input is one
`error: ...` line on stderr and exit code 2, never a traceback: the rules for that live here, once.
"""
from __future__ import annotations

import os
import sys
from typing import NoReturn, Sequence

from absl import flags


def usage_error(message) -> NoReturn:
  from diffusion_jax.config import one_line
  print(f"error: {one_line(message)}", file=sys.stderr)
  sys.exit(2)


def _unknown_key_message(argv: Sequence[str], missing: str) -> str:
  """ml_collections names only the last part of an unknown key; find the full override that used it."""
  for arg in argv[1:]:
    key = arg.split("=", 1)[0].lstrip("-")
    if key.startswith("config.") and missing in key.split("."):
      return f"unknown config key '{key.removeprefix('config.')}' (--{key})"
  return f"unknown config key '{missing}'"


def parse_flags(argv: Sequence[str]) -> list[str]:
  """`flags.FLAGS(argv)`, with every parse failure (unknown flag or config key, bad value) a `usage_error`."""
  # Config files import `configs.common`; make the folder holding `configs/` importable wherever we run from.
  for arg in argv[1:]:
    if arg.startswith("--config="):
      path = os.path.abspath(arg.split("=", 1)[1].split(":", 1)[0])
      sys.path.insert(0, os.path.dirname(os.path.dirname(path)))
  try:
    return flags.FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    name = e.flagname
    kind = "config key" if name.startswith("config.") else "flag"
    usage_error(f"unknown {kind} '{name.removeprefix('config.')}' (--{name})")
  except flags.Error as e:
    usage_error(str(e).replace("\n", " "))
  except (AttributeError, KeyError) as e:
    usage_error(_unknown_key_message(argv, str(e).strip("'\" ")))
  except (TypeError, ValueError) as e:
    usage_error(e)
