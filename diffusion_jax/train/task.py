"""The task interface: everything that differs between objectives, and nothing the trainer already does.

A task builds its model, says which parts of it train (one or several named updates, each with its loss and
optimizer section), which stay frozen and where frozen or initial weights come from; it turns a batch into a loss
(pure and jittable) and samples from a model. The one trainer (`train.trainer`) owns the loop, sharding, optimizers,
EMA, checkpoints, evaluation (`config.evals`, `train.evaluators`) and logging for every task.

A minimal task writes `build_model` and `loss`; see docs/architecture.md for a worked example.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence

import jax
from flax import nnx

from diffusion_jax.data import pipeline
from diffusion_jax.data.sources import make_source
from diffusion_jax.parallel import mesh as mesh_lib
from diffusion_jax.registry import Registry
from diffusion_jax.train.parts import Filter, Update

# Built-in tasks register themselves when their module is imported; loaded by name (a plug-in list, not an import
# of the tasks package, which itself imports this module).
TASKS = Registry("task", ("diffusion_jax.tasks.diffusion", "diffusion_jax.tasks.reflow",
                          "diffusion_jax.tasks.contrastive", "diffusion_jax.tasks.autoencoder",
                          "diffusion_jax.tasks.llava", "diffusion_jax.tasks.unclip_prior",
                          "diffusion_jax.tasks.unclip_ar_prior", "diffusion_jax.tasks.unclip_decoder",
                          "diffusion_jax.tasks.upsampler", "diffusion_jax.tasks.vae",
                          "diffusion_jax.tasks.gan", "diffusion_jax.tasks.noisy_classifier",
                          "diffusion_jax.tasks.dalle", "diffusion_jax.tasks.mae", "diffusion_jax.tasks.classify",
                          "diffusion_jax.tasks.concept"))
register = TASKS.register


@dataclasses.dataclass
class ModelContext:
  """A model's variables on the trainer's mesh, for evaluation, sampling and data preparation.

  `states` are the NNX states that `nnx.merge(graphdef, *states)` turns into the module (in evaluation mode:
  running averages, no dropout); parameters are the EMA copies where the run evaluates with them. `jit` compiles a
  function of the module once per trainer, with the variables passed as an argument rather than baked in, so a
  periodic evaluation reuses the program it compiled the first time.
  """
  graphdef: nnx.GraphDef
  states: tuple
  mesh: jax.sharding.Mesh
  step: int
  workdir: str
  is_main_process: bool
  batch_sharding: jax.sharding.Sharding
  jit_cache: dict = dataclasses.field(default_factory=dict)
  memo: dict = dataclasses.field(default_factory=dict)  # results several evaluators of this context share

  def global_batch(self, local_batch: Mapping[str, Any]) -> dict:
    """This process's rows → global arrays sharded along the batch axes (what a multi-host eval needs)."""
    return mesh_lib.global_batch(self.batch_sharding, local_batch)

  def merge(self) -> nnx.Module:
    return nnx.merge(self.graphdef, *self.states)

  def jit(self, fn: Callable[..., Any], key: Optional[Hashable] = None) -> Callable[..., Any]:
    """`fn(model, *args)` jitted once per `key` (default: `fn` itself, so pass the same function object — a bound
    method is the same object for this purpose) and called with this context's variables."""
    key = (fn if key is None else key, self.graphdef)
    jitted = self.jit_cache.get(key)
    if jitted is None:
      graphdef = self.graphdef
      jitted = jax.jit(lambda states, *args: fn(nnx.merge(graphdef, *states), *args))
      self.jit_cache[key] = jitted
    states = self.states

    def call(*args):
      with jax.set_mesh(self.mesh):
        return jitted(states, *args)

    return call


class Task(abc.ABC):
  # The pipeline stage that turns decoded records into model rows (`pipeline.make_dataset`'s `examples`); None is
  # the caption → tokens stage of the image–text tasks.
  data_examples: Optional[Callable] = None
  # The tasks whose finished runs this one's LoRA adapters may go on (`lora.base_workdir`); None: its own.
  base_tasks: Optional[tuple[str, ...]] = None

  def __init__(self, config):
    self.config = config

  @abc.abstractmethod
  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    """Every module of the task (trained, frozen and mutable parts) as one NNX module."""

  def loss(self, model: nnx.Module, batch: Mapping[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
    """The default update's scalar loss and a dict of scalar metrics; pure, traced inside the jitted step.

    In training `batch` also holds 'step', the int32 step being taken (absent when evaluation calls this).
    """
    raise NotImplementedError(f"{type(self).__name__} defines neither loss() nor updates()")

  def updates(self) -> Sequence[Update]:
    """The optimizer steps of one train step, in order; by default one update of every trainable parameter."""
    return (Update("main", self.loss),)

  def frozen(self) -> Filter:
    """Parameters that never train (a locked tower, a perceptual network, a VAE reused from another run)."""
    return nnx.Nothing()

  def weight_sources(self) -> Sequence[Any]:
    """Weights from elsewhere (`train.runs` sources: finished runs, pretrained folders, files). They fill frozen
    parameters at every start, and trainable ones only when a run starts from scratch."""
    return ()

  def prepare(self, ctx: ModelContext, *, training: bool) -> None:
    """Work that needs the model's weights before the first step or evaluation (a latent cache, reflow pairs).

    Called once per run after the state is restored or initialised; `training` is False in --mode eval/sample.
    """

  def check_run(self) -> None:
    """Fails in one line (DataError, ConfigError) before a training run compiles anything: when the training data
    cannot be opened, or the run could not do what it is set to do at its end."""
    make_source(self.config.data, self.config.data.train_split)

  def train_dataset(self, ctx: ModelContext, *, global_batch_size: int, seed: int):
    """This process's training batches (an iterator whose position `pipeline.get_iterator_state` can save)."""
    d = self.config.data
    return pipeline.make_dataset(d, d.train_split, global_batch_size=global_batch_size, seed=seed,
                                 process_index=jax.process_index(), process_count=jax.process_count(),
                                 examples=self.data_examples)

  def sample(self, ctx: ModelContext, out_dir: str) -> dict[str, Any]:
    """Writes samples into `out_dir` (a fresh folder); returns what it wrote, with 'grid_image' for TensorBoard."""
    return {}

  def activation_sites(self) -> Optional[list[tuple[int, int, int]]]:
    """(count, tokens, width) of the row-parallel layers, for the planner's tensor-parallel traffic; None if
    unknown."""
    return None


def get_task(config) -> Task:
  return TASKS.get(config.task, "task")(config)
