"""optax optimizers and learning-rate schedules from the config's optimizer sections (`optim`, `disc_optim`, ...).

Each update of a task names its section (`parts.Update.optimizer`); a section holds name, lr, schedule, warm-up,
betas, eps, weight decay and global-norm clipping. Frozen parameters never reach an optimizer (see `train.parts`).
"""
from __future__ import annotations

import jax
import optax

from diffusion_jax.config import ConfigError

SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adamw", "sgd")


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


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (decay on matrices only) or SGD with momentum, after global-norm clipping; and its schedule.

  `total_steps` counts this optimizer's steps: train steps times the update's repeats.
  """
  schedule = learning_rate_schedule(optim_cfg, total_steps)
  if optim_cfg.name == "adamw":
    opt = optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                      weight_decay=optim_cfg.weight_decay, mask=decay_mask)
  elif optim_cfg.name == "sgd":
    opt = optax.sgd(schedule, momentum=optim_cfg.b1 or None)
  else:
    raise ConfigError(f"optim.name must be one of {OPTIMIZERS}, got {optim_cfg.name!r}")
  chain = [optax.clip_by_global_norm(optim_cfg.grad_clip)] if optim_cfg.grad_clip else []
  return optax.chain(*chain, opt), schedule
