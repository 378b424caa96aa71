"""Frozen models taken from other runs: held beside the trained state, never in it.

Latent diffusion encodes images with a finished autoencoder run's VAE and prompts with a finished contrastive run's
text tower. Neither is trained again, so neither belongs in the trainer's state (no optimizer slots, no EMA copy, no
room in the checkpoint). Each is a `FrozenModel`: a copy of its parameters on this process's first device, passed
to its own jitted functions as an argument (baked into a program as constants, large weights would bloat every
compile). Every process holds the whole copy and encodes its own rows, so no collective is ever involved.

A run is restored with the trainer's own mechanism, as reflow restores its teacher: its newest checkpoint, with the
EMA parameters when that run evaluates with them, rebuilt from the config the checkpoint saved, so a path is all a
user gives. The current run's mesh and batch settings replace the saved ones: the saved run may have had other
hardware, and neither changes a parameter.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from diffusion_jax.config import ConfigError


def run_config(workdir: str, what: str, *, task: str) -> tuple[ml_collections.ConfigDict, int]:
  """The config a finished run saved with its newest checkpoint, and that step; `what` names the option in errors."""
  from diffusion_jax.train.checkpointing import Checkpointer
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise ConfigError(f"{what}={workdir!r} holds no checkpoints: train that run first")
  ckpt = Checkpointer(directory, async_save=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise ConfigError(f"{what}={workdir!r} holds no complete checkpoint: train that run first")
    config = ml_collections.ConfigDict(ckpt.read_config(step))
  finally:
    ckpt.close()
  if config.get("task") != task:
    raise ConfigError(f"{what}={workdir!r} is a {config.get('task')!r} run, not a {task!r} run")
  return config, step


def restore_model(workdir: str, saved: ml_collections.ConfigDict, like: ml_collections.ConfigDict,
                  step: int) -> nnx.Module:
  """The run's whole model at its newest checkpoint, as a concrete module local to this process."""
  from diffusion_jax.train.trainer import Trainer  # the trainer imports the tasks
  config = ml_collections.ConfigDict(saved.to_dict())
  config.mesh, config.sharding = like.mesh, like.sharding
  config.train.batch_size, config.train.grad_accum_steps = like.train.batch_size, 1
  trainer = Trainer(config, workdir)
  try:
    state = trainer.load_for_inference()
  except ValueError as e:  # orbax: the checkpoint's tree does not match the saved config's model
    raise ConfigError(f"the checkpoint in {workdir} does not fit the config it saved: {e}") from e
  if int(state.step) != step:
    raise ConfigError(f"{workdir} moved on from step {step} to {int(state.step)} while this run started; "
                      "wait until it has finished")
  logging.info("restored frozen %s model from %s at step %d", config.task, workdir, step)
  return trainer.model_context(state).merge()


def _local(x: jax.Array) -> jax.Array:
  if jax.process_count() > 1:
    x = multihost_utils.process_allgather(x, tiled=True)  # whole values, also of arrays sharded across hosts
  return jax.device_put(np.asarray(jax.device_get(x)), jax.local_devices()[0])


class FrozenModel:
  """A module's parameters on this process's first device, and jitted functions of them."""

  def __init__(self, module: nnx.Module):
    self.graphdef, state = nnx.split(module)
    self.state = jax.tree.map(_local, state)
    # Its own one-device mesh: callers (evaluation, sampling) may run inside the trainer's mesh context.
    self.mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:1]), ("frozen",))

  def jit(self, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn(module, *args)` jitted, with the parameters an argument rather than constants of the program."""
    graphdef = self.graphdef
    jitted = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))

    def call(*args):
      with jax.set_mesh(self.mesh):
        return jitted(self.state, *args)

    return call


class TextTower:
  """A contrastive run's text tower, frozen: tokens → (token states [L, width], projected embedding [embed_dim]).

  The states are what the U-Net cross-attends to (the final-layer-normed states, as Stable Diffusion takes CLIP's);
  the projected embedding, the vector CLIP trained to match images, is the pooled conditioning (SDXL's
  `text_embeds`). The tower's tokenizer and context length come with it: prompts must be tokenized its way.
  """

  def __init__(self, workdir: str, like: ml_collections.ConfigDict):
    from diffusion_jax.tasks.base import get_task
    self.workdir = os.path.abspath(workdir)
    self._saved, self._step = run_config(self.workdir, "text.clip_workdir", task="contrastive")
    model_config = get_task(self._saved).model_config
    self.tokenizer = self._saved.data.tokenizer
    self.max_len = int(self._saved.data.max_text_len)
    self.width, self.embed_dim = model_config.text.width, model_config.embed_dim
    self.identity = {"clip_workdir": self.workdir, "clip_step": self._step}
    self._like = like
    self._encode = None
    self.encode(np.zeros((1, self.max_len), np.int32))  # restored now, outside any mesh context (see latents.py)

  def encode(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if self._encode is None:
      model = FrozenModel(restore_model(self.workdir, self._saved, self._like, self._step))

      def encode(clip, tokens):
        states, pooled = clip.text_model.encode(tokens)
        return states, clip.text_projection(pooled)

      self._encode = model.jit(encode)
    states, pooled = self._encode(np.asarray(tokens, np.int32))
    return np.asarray(states), np.asarray(pooled)


def text_tower(config) -> TextTower | None:
  """The frozen text tower `text.clip_workdir` names, or None (the denoiser trains its own)."""
  workdir = (config.get("text") or {}).get("clip_workdir", "")
  return TextTower(workdir, config) if workdir else None
