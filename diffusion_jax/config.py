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
