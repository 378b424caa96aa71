"""Named plug-ins (tasks, evaluators, pretrained-weight loaders): entries register under names; built-in modules are
imported by name on the first lookup, so a registry never imports the packages that register into it."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Sequence

from diffusion_jax.config import ConfigError


class Registry:

  def __init__(self, what: str, builtin_modules: Sequence[str] = ()):
    self.what, self._modules, self._entries = what, tuple(builtin_modules), {}

  def register(self, *names: str) -> Callable[[Any], Any]:
    def deco(obj):
      for name in names:
        self._entries[name] = obj
      return obj
    return deco

  def _import_builtins(self) -> None:
    for module in self._modules:
      importlib.import_module(module)

  def names(self) -> list[str]:
    self._import_builtins()
    return sorted(self._entries)

  def find(self, name: str) -> Any:
    """The entry `name`, or None."""
    self._import_builtins()
    return self._entries.get(name)

  def get(self, name: str, option: str) -> Any:
    """The entry `name`; a ConfigError naming the config `option` and the known names otherwise."""
    entry = self.find(name)
    if entry is None:
      raise ConfigError(f"{option}={name!r} is not a known {self.what}; known: {', '.join(self.names())}")
    return entry
