"""The denoising training objective (Ho et al. 2020's "simple" loss, for any of the three parameterisations)."""
from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import schedules as sched_lib

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def diffusion_loss(model_fn: ModelFn, schedule: sched_lib.NoiseSchedule, x0: jax.Array, rng: jax.Array, *,
                   prediction_type: str = 'epsilon', weights: jax.Array | None = None):
  """Mean squared error between `model_fn(x_t, t)` and the target of `prediction_type`.

  t ~ U{0..T-1} and the noise are drawn from `rng`, one per example. The per-example MSE is averaged with `weights`
  [B] (a float mask: 0 drops an example, e.g. padding that fills the last global batch), so the loss has the same
  scale whatever fraction of the batch is real. Pure and jittable; returns (loss, aux) for `jax.value_and_grad(...,
  has_aux=True)`.
  """
  batch = x0.shape[0]
  t_rng, noise_rng = jax.random.split(rng)
  t = jax.random.randint(t_rng, (batch,), 0, schedule.num_timesteps, dtype=jnp.int32)
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)

  if weights is None:
    weights = jnp.ones((batch,), jnp.float32)
  keep = weights > 0
  weights = jnp.where(keep, weights.astype(jnp.float32), 0.0)
  # Dropped examples never reach the model, so padding that holds garbage (or NaN) cannot leak into the loss or,
  # through batch-coupled layers, into the other examples.
  x0 = jnp.where(keep.reshape((batch,) + (1,) * (x0.ndim - 1)), x0, jnp.zeros_like(x0))

  x_t = sched_lib.q_sample(schedule, x0, t, noise)
  target = sched_lib.target_for(schedule, x0, noise, t, prediction_type)
  output = model_fn(x_t, t)
  if output.shape != target.shape:
    raise ValueError(f'model output shape {output.shape} does not match the target shape {target.shape}')
  # Squares in float32 even for bf16 models: the loss near t = 0 is tiny and bf16 would round it to noise.
  err = jnp.square(output.astype(jnp.float32) - target.astype(jnp.float32))
  loss_per_example = jnp.mean(err.reshape(batch, -1), axis=1)

  # Floor rather than max(., 1): fractional weights (e.g. SNR weighting) must not be rescaled; an all-zero mask
  # gives loss 0 and zero gradients instead of 0/0.
  weight_sum = jnp.sum(weights)
  denom = jnp.maximum(weight_sum, 1e-12)
  # where, not a product: 0 * NaN from a dropped example would still be NaN.
  loss = jnp.sum(jnp.where(keep, weights * loss_per_example, 0.0)) / denom
  aux = {
      'loss_per_example': loss_per_example,
      'timesteps': t,
      'mean_t': jnp.sum(weights * t.astype(jnp.float32)) / denom,
      'weight_sum': weight_sum,
  }
  return loss, aux
