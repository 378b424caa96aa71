"""optax optimizer and learning-rate schedule from the config's `optim` section."""
from __future__ import annotations

import re
from typing import Sequence

import jax
import optax

from diffusion_jax.config import ConfigError


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  lr, warmup = optim_cfg.lr, int(optim_cfg.warmup_steps)
  if optim_cfg.schedule == "constant":
    return optax.linear_schedule(0.0, lr, max(warmup, 1)) if warmup else optax.constant_schedule(lr)
  if optim_cfg.schedule == "cosine":
    decay_steps = max(total_steps, warmup + 1)
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), decay_steps, end_value=lr * optim_cfg.end_lr_factor)
  raise ConfigError(f"optim.schedule must be 'constant' or 'cosine', got {optim_cfg.schedule!r}")


def decay_mask(params):
  """Weight decay on matrices and kernels only: norms, biases and scalars (e.g. temperatures) are excluded."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def param_name(path) -> str:
  """'text_model.blocks.0.attn.kernel' for a key path into an nnx.State of parameters."""
  name = jax.tree_util.keystr(tuple(path), simple=True, separator=".")
  return name[: -len(".value")] if name.endswith(".value") else name


def frozen_labels(params, patterns: Sequence[str]):
  """'frozen' for every parameter whose dotted name matches one of the regex `patterns` (from its start)."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if any(c.match(param_name(path)) for c in compiled) else "trainable", params)


def make_optimizer(optim_cfg, total_steps: int, frozen: Sequence[str] = ()
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW/SGD with clipping; parameters matching a `frozen` pattern get no update (and no weight decay)."""
  schedule = learning_rate_schedule(optim_cfg, total_steps)
  if optim_cfg.name == "adamw":
    opt = optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                      weight_decay=optim_cfg.weight_decay, mask=decay_mask)
  elif optim_cfg.name == "sgd":
    opt = optax.sgd(schedule, momentum=optim_cfg.b1 or None)
  else:
    raise ConfigError(f"optim.name must be 'adamw' or 'sgd', got {optim_cfg.name!r}")
  chain = [optax.clip_by_global_norm(optim_cfg.grad_clip)] if optim_cfg.grad_clip else []
  tx = optax.chain(*chain, opt)
  if frozen:
    for pattern in frozen:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ConfigError(f"optim.frozen pattern {pattern!r} is not a regular expression: {e}") from None
    tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()},
                               lambda params: frozen_labels(params, frozen))
  return tx, schedule
