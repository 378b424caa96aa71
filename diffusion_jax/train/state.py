"""The training state pytree: what a step reads and writes, and what a checkpoint holds.

Parameters, optimizer states and EMA copies are dicts keyed by update name (`parts.Update`), so each update has
its own optimizer and only the updates `ema.updates` names carry an EMA. Frozen parameters are not here: they are
an argument of the step beside the state, rebuilt at every start, never saved.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
  step: jax.Array
  params: dict[str, nnx.State]
  opt_state: dict[str, optax.OptState]
  ema: dict[str, nnx.State]  # only for the updates with an EMA; {} without
  mutable: nnx.State  # non-Param variables (batch statistics, ...); empty for most models

  def eval_params(self, use_ema: bool) -> dict[str, nnx.State]:
    """Each update's parameters as evaluation sees them: its EMA where it has one and `use_ema`."""
    return {name: self.ema[name] if use_ema and name in self.ema else p for name, p in self.params.items()}


def ema_decay_at(step: jax.Array, decay: float, warmup: bool = True) -> jax.Array:
  """EMA decay with the usual (1 + n) / (10 + n) warm-up, so early averages are not dominated by the init."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  n = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def update_ema(ema: Any, params: Any, decay: jax.Array) -> Any:
  return jax.tree.map(lambda e, p: e * decay + p.astype(e.dtype) * (1.0 - decay), ema, params)


def all_finite(tree: Any) -> jax.Array:
  """Whether every floating-point value in `tree` is finite (one fused reduction inside the step)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.asarray(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
