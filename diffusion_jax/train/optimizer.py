"""optax optimizers and learning-rate schedules from the config's optimizer sections (`optim`, `disc_optim`, ...).

Each update of a task names its section (`parts.Update.optimizer`); a section holds name, lr, schedule, warm-up,
betas, eps, weight decay, global-norm clipping, `layer_decay` (d < 1: layer-wise learning-rate decay, BEiT's and
MAE's fine-tuning recipe) and `clip_weights` (c > 0: after every step each parameter is projected into [-c, c],
WGAN's critic). Frozen parameters never reach an optimizer (see `train.parts`).
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from diffusion_jax.config import ConfigError

SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adamw", "sgd", "rmsprop")


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  lr, warmup = optim_cfg.lr, int(optim_cfg.warmup_steps)
  if optim_cfg.schedule == "constant":
    return optax.linear_schedule(0.0, lr, max(warmup, 1)) if warmup else optax.constant_schedule(lr)
  if optim_cfg.schedule == "cosine":
    decay_steps = max(total_steps, warmup + 1)
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), decay_steps, end_value=lr * optim_cfg.end_lr_factor)
  raise ConfigError(f"optim.schedule must be one of {SCHEDULES}, got {optim_cfg.schedule!r}")


def decay_mask(params):
  """Weight decay on matrices and kernels only: norms, biases and scalars (e.g. temperatures) are excluded."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def section(config, name: str):
  """The optimizer section `name` of the config (dotted names reach into sub-sections)."""
  node = config
  for part in name.split("."):
    if part not in node:
      raise ConfigError(f"the task's update needs an optimizer section {name!r}, which the config lacks")
    node = node[part]
  return node


def clip_weights(c: float) -> optax.GradientTransformation:
  """The last link of a chain: turns an update u into the one that lands on clip(p + u, -c, c).

  A projection after the step, not a change of the gradient: the parameters the trainer's `apply_updates` makes are
  within [-c, c] (to one rounding of p + (clip(p + u) - p)).
  """

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("clip_weights needs the parameters: call update(grads, state, params)")
    updates = jax.tree.map(lambda p, u: jnp.clip(p + u, -c, c).astype(p.dtype) - p, params, updates)
    return updates, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EMBEDDING = re.compile(r"(?:^|\.)(patch_embedding|class_embedding|position_embedding|pre_layernorm)(?:\.|$)")


def layer_depth(name: str) -> int | None:
  """A parameter's depth in a transformer tower by its dotted name: 0 for the embeddings, i + 1 inside
  `layers.{i}`, None for what comes after the last layer (final norm, heads)."""
  m = _LAYER.search(name)
  if m:
    return int(m[1]) + 1
  return 0 if _EMBEDDING.search(name) else None


def layer_decay(decay: float) -> optax.GradientTransformation:
  """Scales each parameter's update by decay^(L + 1 - depth) (`layer_depth`, L the number of layers found, the
  parts after the last layer at depth L + 1): the embeddings move least, the head at the full rate. Placed after
  the optimizer, it scales the weight decay term with the learning rate, as per-group learning rates do."""
  from diffusion_jax.train.parts import dotted

  def update(updates, state, params=None):
    del params
    leaves = jax.tree_util.tree_flatten_with_path(updates)[0]
    depths = {dotted(path): layer_depth(dotted(path)) for path, _ in leaves}
    top = max((d for d in depths.values() if d is not None), default=0) + 1
    scale = lambda path, u: u * decay ** (top - (top if depths[dotted(path)] is None else depths[dotted(path)]))
    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (decay on matrices only), SGD with momentum or RMSProp (decay b2), after global-norm clipping and
  before weight clipping; and its schedule.

  `total_steps` counts this optimizer's steps: train steps times the update's repeats.
  """
  schedule = learning_rate_schedule(optim_cfg, total_steps)
  if optim_cfg.name == "adamw":
    opt = optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                      weight_decay=optim_cfg.weight_decay, mask=decay_mask)
  elif optim_cfg.name == "sgd":
    opt = optax.sgd(schedule, momentum=optim_cfg.b1 or None)
  elif optim_cfg.name == "rmsprop":
    opt = optax.rmsprop(schedule, decay=optim_cfg.b2, eps=optim_cfg.eps, momentum=optim_cfg.b1 or None)
  else:
    raise ConfigError(f"optim.name must be one of {OPTIMIZERS}, got {optim_cfg.name!r}")
  chain = [optax.clip_by_global_norm(optim_cfg.grad_clip)] if optim_cfg.grad_clip else []
  chain.append(opt)
  decay = float(optim_cfg.get("layer_decay", 1.0))
  if not 0.0 < decay <= 1.0:
    raise ConfigError(f"layer_decay must be in (0, 1] (1: off), got {decay}")
  if decay < 1.0:
    chain.append(layer_decay(decay))
  if optim_cfg.clip_weights:
    if optim_cfg.clip_weights < 0:
      raise ConfigError(f"clip_weights must be >= 0 (0: off), got {optim_cfg.clip_weights}")
    chain.append(clip_weights(float(optim_cfg.clip_weights)))
  return optax.chain(*chain), schedule
