"""The task interface: everything that differs between objectives, and nothing the trainer already does.

A task builds its model, turns a batch into a loss and scalar metrics (pure and jittable), and knows how to
evaluate and sample from a set of parameters. The one trainer (`diffusion_jax.train.trainer`) owns the
loop, sharding, optimizer, EMA, checkpoints and logging for every task.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
from flax import nnx


@dataclasses.dataclass
class ModelContext:
  """What evaluation and sampling get from the trainer: the model split into graph + (EMA) parameters."""
  graphdef: nnx.GraphDef
  params: nnx.State
  rest: nnx.State
  mesh: jax.sharding.Mesh
  step: int
  workdir: str
  is_main_process: bool
  batch_sharding: jax.sharding.Sharding

  def global_batch(self, local_batch: Mapping[str, Any]) -> dict:
    """This process's rows → global arrays sharded along the batch axes (what a multi-host eval needs)."""
    from diffusion_jax.parallel.mesh import global_batch
    return global_batch(self.batch_sharding, local_batch)

  def merge(self, params=None) -> nnx.Module:
    return nnx.merge(self.graphdef, self.params if params is None else params, self.rest)

  def jit_apply(self, fn: Callable[..., Any]) -> Callable[..., Any]:
    """jax.jit of `fn(model, *args)`, with the parameters passed as an argument rather than baked in."""
    graphdef, rest = self.graphdef, self.rest

    @jax.jit
    def apply(params, *args):
      return fn(nnx.merge(graphdef, params, rest), *args)

    return lambda *args: apply(self.params, *args)


class Task(abc.ABC):

  def __init__(self, config):
    self.config = config

  @abc.abstractmethod
  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    """All trainable modules of the task, as one NNX module."""

  @abc.abstractmethod
  def loss(self, model: nnx.Module, batch: Mapping[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
    """Scalar loss and a dict of scalar metrics; pure, traced inside the jitted train step.

    In training, `batch` also holds 'step', the int32 step being taken (absent when evaluation calls this).
    """

  def frozen_parameters(self) -> tuple[str, ...]:
    """Regexes of dotted parameter names the optimizer must leave untouched (e.g. a locked image tower)."""
    return ()

  def initial_weights(self) -> Optional[Mapping[str, Any]]:
    """Dotted parameter name → array for parameters that start from pretrained weights instead of their init.

    Applied once when a run starts from scratch; a resumed run takes everything from its checkpoint.
    """
    return None

  def train_dataset(self, workdir: str, *, global_batch_size: int, seed: int, process_index: int,
                    process_count: int):
    """This process's training batches (an iterator whose position `pipeline.get_iterator_state` can save).

    By default `config.data` through the shared grain pipeline; a task that makes its own training data
    (reflow pairs) overrides it, and may keep that data in `workdir`.
    """
    from diffusion_jax.data import pipeline
    return pipeline.make_dataset(self.config.data, self.config.data.train_split, global_batch_size=global_batch_size,
                                 seed=seed, process_index=process_index, process_count=process_count)

  def evaluate(self, ctx: ModelContext) -> dict[str, float]:
    return {}

  def sample(self, ctx: ModelContext, out_dir: str) -> dict[str, Any]:
    return {}


_REGISTRY: dict[str, Callable[[Any], Task]] = {}


def register(name: str):
  def deco(cls):
    _REGISTRY[name] = cls
    return cls
  return deco


def get_task(config) -> Task:
  from diffusion_jax.config import ConfigError
  import diffusion_jax.tasks  # noqa: F401  (registers the built-in tasks)
  if config.task not in _REGISTRY:
    raise ConfigError(f"unknown task {config.task!r}; known tasks: {sorted(_REGISTRY)}")
  return _REGISTRY[config.task](config)
