"""Config loading and validation shared by the CLI and the planner.

Configs are `get_config(arg)` files returning a locked `ml_collections.ConfigDict`. Anything a user can get wrong in
a config (an unknown key, a wrong type, a missing required field) surfaces as a `ConfigError` whose message fits
on one line, and the CLI turns it into exit code 2.
"""
from __future__ import annotations

import re

import ml_collections


class ConfigError(ValueError):
  """A user-facing configuration problem; its message is one line."""


def one_line(message: str) -> str:
  # ml_collections puts the whole config in its messages; keep the first sentence.
  message = str(message).strip().strip("'\"")
  message = re.split(r"\s*Other fields present", message)[0]
  return " ".join(message.split())


def check_required(config: ml_collections.ConfigDict, fields: list[str]) -> None:
  """Raises ConfigError if any dotted field in `fields` is empty ('' or None)."""
  for dotted in fields:
    node = config
    for part in dotted.split("."):
      if part not in node:
        raise ConfigError(f"config field '{dotted}' is required but the config has no such field")
      node = node[part]
    if node is None or node == "":
      raise ConfigError(f"config field '{dotted}' is required (set it with --config.{dotted}=...)")
