"""User-facing configuration errors and their one-line messages.

Configs are `get_config(arg)` files returning a locked `ml_collections.ConfigDict`. Anything a user can get wrong in
a config (an unknown key, a wrong type, a missing required field) surfaces as one line on stderr and exit code 2.
"""
from __future__ import annotations

import re



class ConfigError(ValueError):
  """A user-facing configuration problem; its message is one line."""


def one_line(message: str) -> str:
  # ml_collections puts the whole config in its messages; keep the first sentence.
  message = str(message).strip().strip("'\"")
  message = re.split(r"\s*Other fields present", message)[0]
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
