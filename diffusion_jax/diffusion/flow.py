"""Rectified flow (flow matching): the training objective and reflow pairs, in diffusers' flow conventions.

The path is x_t = (1 - t) x_0 + t noise for t in [0, 1] (t = 1 is pure noise, FlowMatchEulerDiscreteScheduler's
sigma), and the model predicts the constant velocity of that line, v = noise - x_0, so that sampling integrates
dx/dt = v from t = 1 down to 0 (`samplers.sample(..., sampler='flow_euler', prediction_type='flow_prediction')`).

Time convention: the model is called as `model_fn(x_t, t * num_train_timesteps)` with float32 t of shape [B], the
scale diffusers passes to SD3/Flux transformers (timesteps = sigma * 1000), so that a model trained here samples
with diffusers' scheduler and a diffusers-trained one samples here, without rescaling its time embedding.
"""
from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import samplers, weighted_loss

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
TIME_SAMPLINGS = ('logit_normal', 'uniform')


def sample_time(rng: jax.Array, batch: int, *, time_sampling: str = 'logit_normal', logit_mean: float = 0.0,
                logit_std: float = 1.0) -> jax.Array:
  """Per-example t in (0, 1): 'uniform', or 'logit_normal' (SD3's default, Esser et al. 2024 eq. 19), which
  spends the training steps on the middle of the path, where the velocity is hardest to predict."""
  if time_sampling == 'uniform':
    return jax.random.uniform(rng, (batch,), jnp.float32)
  if time_sampling == 'logit_normal':
    return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch,), jnp.float32))
  raise ValueError(f'unknown time_sampling {time_sampling!r}; expected one of {TIME_SAMPLINGS}')


def flow_matching_loss(model_fn: ModelFn, x0: jax.Array, rng: jax.Array, *, time_sampling: str = 'logit_normal',
                       logit_mean: float = 0.0, logit_std: float = 1.0, weights: jax.Array | None = None,
                       noise: jax.Array | None = None, num_train_timesteps: int = 1000):
  """Mean squared error between `model_fn(x_t, t * num_train_timesteps)` and the velocity noise - x_0.

  t and (unless given) the noise are drawn from `rng`, one per example. `noise` pairs each x_0 with a fixed noise
  instead: reflow training on `reflow_pairs` output. `weights` [B] masks examples exactly as `objectives.
  diffusion_loss` does (0 drops one, even one holding NaN; the loss keeps its scale whatever fraction is real).
  Pure and jittable; returns (loss, aux) for `jax.value_and_grad(..., has_aux=True)`.
  """
  batch = x0.shape[0]
  t_rng, noise_rng = jax.random.split(rng)
  t = sample_time(t_rng, batch, time_sampling=time_sampling, logit_mean=logit_mean, logit_std=logit_std)
  if noise is None:
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  elif noise.shape != x0.shape:
    raise ValueError(f'noise shape {noise.shape} does not match x0 shape {x0.shape}')

  keep, weights = weighted_loss.example_weights(weights, batch)
  x0, noise = weighted_loss.drop_examples(x0, keep), weighted_loss.drop_examples(noise, keep)

  t_b = t.reshape((batch,) + (1,) * (x0.ndim - 1))
  x_t = ((1.0 - t_b) * x0 + t_b * noise).astype(x0.dtype)
  target = noise.astype(jnp.float32) - x0.astype(jnp.float32)
  loss, parts = weighted_loss.mse(model_fn(x_t, t * num_train_timesteps), target, keep, weights)
  aux = {
      'loss_per_example': parts['loss_per_example'],
      'sigmas': t,
      'mean_sigma': jnp.sum(weights * t) / parts['denom'],
      'weight_sum': parts['weight_sum'],
  }
  return loss, aux


def reflow_pairs(model_fn: ModelFn, noise: jax.Array, *, num_steps: int, shift: float = 1.0,
                 use_karras_sigmas: bool = False, num_train_timesteps: int = 1000):
  """(noise, x_0) pairs for reflow (Liu et al. 2022, "Flow Straight and Fast"): x_0 is the trained flow's sample
  from that noise (`flow_euler`, one compiled scan).

  Retraining with `flow_matching_loss(model_fn, x0, rng, noise=noise)` on such pairs straightens the flow, so that
  fewer sampling steps suffice. Draw `noise` from a standard normal; jit the call for large batches.
  """
  x0 = samplers.sample(model_fn, None, noise, None, sampler='flow_euler', num_steps=num_steps,
                       prediction_type=samplers.FLOW_PREDICTION, clip_x0=False, shift=shift,
                       use_karras_sigmas=use_karras_sigmas, num_train_timesteps=num_train_timesteps)
  return noise, x0
