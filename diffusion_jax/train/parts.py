"""The parts of a task's model: parameters trained by each update, frozen parameters, and mutable state.

A task builds one NNX module; NNX filters cut its variables into
  * one set of trainable `nnx.Param`s per update (`Update.params`), each with its own optimizer state and EMA;
  * frozen `nnx.Param`s (`Task.frozen`, plus the config's `train.frozen` regexes): sharded like the rest, passed
    to the step but never differentiated, and neither checkpointed nor copied into optimizer or EMA state — they
    are rebuilt from their init and their weight sources at every start;
  * mutable state: every other `nnx.Variable` (batch statistics, spectral-norm vectors, codebook EMAs), written by
    the forward pass, carried from step to step and checkpointed.

Every trainable parameter belongs to exactly one update; `Partition.check` says which does not, by name.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
from flax import nnx

from diffusion_jax.config import ConfigError

Filter = Any  # an NNX filter: a Variable type, a callable (path, value) -> bool, nnx.PathContains, nnx.All, ...


def dotted(path) -> str:
  """'text_model.layers.0.attn.kernel' for a path of NNX keys (or a jax key path into an nnx.State)."""
  parts = []
  for p in path:
    p = getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))
    parts.append(str(p))
  name = ".".join(parts)
  return name[: -len(".value")] if name.endswith(".value") else name


def matching(*patterns: str) -> Filter:
  """A filter for parameters whose dotted name matches one of the regexes from its start (`'vision_model\\.'`)."""
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise ConfigError(f"{pattern!r} is not a regular expression: {e}") from None
  if not compiled:
    return nnx.Nothing()
  return lambda path, _: any(c.match(dotted(path)) for c in compiled)


def under(*prefixes: str) -> Filter:
  """A filter for everything inside the named submodules (`under('vae', 'conditioners.clip_text')`)."""
  return matching(*(re.escape(p) + r"(\.|$)" for p in prefixes))


@dataclasses.dataclass(frozen=True)
class Update:
  """One optimizer step inside the compiled train step.

  name       metrics go to `train/<name>/…` when a task has several updates (one update logs `train/…`).
  loss       `loss(model, batch, rng) -> (scalar, {name: scalar})`, traced inside the step; the model holds the
             parameters as the updates before this one left them.
  params     which trainable parameters this update moves (default: all of them).
  optimizer  the config section with its optimizer settings (`optim`, `disc_optim`, ...).
  repeat     optimizer steps per train step (a critic's n_critic), run as a `lax.scan`.
  split_batch  each repeat takes its own 1/repeat of the batch's rows instead of the whole batch.
  """
  name: str
  loss: Callable[..., Any]
  params: Filter = nnx.Param
  optimizer: str = "optim"
  repeat: int = 1
  split_batch: bool = False


@dataclasses.dataclass
class Partition:
  """How one model's variables fall into parts; `split` / `merge` go between the module and the parts."""
  updates: Sequence[Update]
  frozen: Filter

  def __post_init__(self):
    names = [u.name for u in self.updates]
    if not names or len(set(names)) != len(names):
      raise ConfigError(f"a task needs at least one update, each with its own name; got {names}")
    for update in self.updates:
      if update.repeat < 1:
        raise ConfigError(f"update {update.name!r} has repeat={update.repeat}; it must be >= 1")

  def filters(self) -> list[Filter]:
    return ([nnx.All(nnx.Param, self.frozen)] + [nnx.All(nnx.Param, u.params) for u in self.updates]
            + [nnx.Param, ...])

  def split(self, model: nnx.Module):
    """(graphdef, frozen, {update: params}, mutable) of `model`."""
    graphdef, frozen, *per_update, leftover, mutable = nnx.split(model, *self.filters())
    if jax.tree.leaves(leftover):
      raise ConfigError(f"parameter {_first_name(leftover)} is trainable but no update trains it: freeze it or "
                        "name it in an update's filter")
    return graphdef, frozen, {u.name: s for u, s in zip(self.updates, per_update)}, mutable

  def check(self, abstract_model: nnx.Module) -> None:
    """Each trainable parameter is moved by exactly one update; names the first that is not."""
    frozen = nnx.filterlib.to_predicate(self.frozen)
    predicates = [(u.name, nnx.filterlib.to_predicate(u.params)) for u in self.updates]
    for path, var in nnx.iter_graph(abstract_model):
      if not isinstance(var, nnx.Param) or frozen(path, var):
        continue
      owners = [name for name, p in predicates if p(path, var)]
      if len(owners) > 1:
        raise ConfigError(f"parameter {dotted(path)} is trained by several updates {owners}; give each parameter "
                          "to one update")
    self.split(abstract_model)  # no trainable parameter without an update

  def merge(self, graphdef: nnx.GraphDef, frozen, params: Mapping[str, Any], mutable, *, copy: bool = False):
    return nnx.merge(graphdef, frozen, *params.values(), mutable, copy=copy)


def _first_name(state) -> str:
  path, _ = jax.tree_util.tree_flatten_with_path(state)[0][0]
  return dotted(path)


def flat_names(state) -> dict[str, Any]:
  """Dotted name → leaf of an nnx.State (or any pytree of arrays)."""
  return {dotted(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def check_patterns_match(abstract_model: nnx.Module, patterns: Sequence[str], option: str) -> None:
  """A ConfigError naming the first regex of the config `option` that matches no parameter (a typo would otherwise
  silently freeze nothing), showing the first few parameter names for the spelling."""
  params = [(path, var) for path, var in nnx.iter_graph(abstract_model) if isinstance(var, nnx.Param)]
  names = [dotted(path) for path, _ in params]
  for pattern in patterns:
    matches = matching(pattern)
    if not any(matches(path, var) for path, var in params):
      raise ConfigError(f"{option}: {pattern!r} matches no parameter (matched from the start of dotted names such "
                        f"as {', '.join(names[:3])})")


def frozen_filter(task_frozen: Filter, config_patterns: Sequence[str]) -> Filter:
  """The task's frozen parts plus the user's `train.frozen` regexes."""
  if not config_patterns:
    return task_frozen
  return nnx.Any(task_frozen, matching(*config_patterns))


def ema_updates(names: Sequence[str], updates: Sequence[Update]) -> Optional[list[str]]:
  """The update names `ema.updates` lists, checked against the task's updates (empty: all)."""
  known = [u.name for u in updates]
  unknown = sorted(set(names) - set(known))
  if unknown:
    raise ConfigError(f"ema.updates names {unknown}, which are not updates of this task ({known})")
  return list(names) or known
