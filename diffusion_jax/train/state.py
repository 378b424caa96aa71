"""The training state pytree: what a step reads and writes, and what a checkpoint holds."""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  ema_params: Optional[nnx.State]


def ema_decay_at(step: jax.Array, decay: float, warmup: bool = True) -> jax.Array:
  """EMA decay with the usual (1 + n) / (10 + n) warm-up, so early averages are not dominated by the init."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  n = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def update_ema(ema: Any, params: Any, decay: jax.Array) -> Any:
  return jax.tree.map(lambda e, p: e * decay + p.astype(e.dtype) * (1.0 - decay), ema, params)
