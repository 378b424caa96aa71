"""The denoising training objective (Ho et al. 2020's "simple" loss, for any of the three parameterisations)."""
from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import flow, schedules as sched_lib, weighted_loss

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def diffusion_loss(model_fn: ModelFn, schedule: sched_lib.NoiseSchedule, x0: jax.Array, rng: jax.Array, *,
                   prediction_type: str = 'epsilon', weights: jax.Array | None = None, snr_gamma: float = 0.0,
                   time_sampling: str = 'uniform', logit_mean: float = 0.0, logit_std: float = 1.0):
  """Mean squared error between `model_fn(x_t, t)` and the target of `prediction_type`.

  `time_sampling='logit_normal'` draws t = floor(T · sigmoid(N(logit_mean, logit_std))) instead of uniformly, as
  the flow objective does (SD3): with the cosine schedule the mode t = T/2 is SNR ≈ 1, where the class and layout
  of an image are decided, rather than spending equal effort on the nearly clean and nearly pure-noise steps.
  `snr_gamma` > 0 weights each example's error by Min-SNR-γ (Hang et al. 2023, `min_snr_weight`): the loss stops
  spending most of its gradient on the nearly clean steps, which converges several times faster.

  t ~ U{0..T-1} and the noise are drawn from `rng`, one per example. The per-example MSE is averaged with `weights`
  [B] (a float mask: 0 drops an example, e.g. padding that fills the last global batch), so the loss has the same
  scale whatever fraction of the batch is real. Pure and jittable; returns (loss, aux) for `jax.value_and_grad(...,
  has_aux=True)`.
  """
  batch = x0.shape[0]
  t_rng, noise_rng = jax.random.split(rng)
  if time_sampling == 'uniform':
    t = jax.random.randint(t_rng, (batch,), 0, schedule.num_timesteps, dtype=jnp.int32)
  else:
    u = flow.sample_time(t_rng, batch, time_sampling=time_sampling, logit_mean=logit_mean, logit_std=logit_std)
    t = jnp.minimum(jnp.floor(u * schedule.num_timesteps), schedule.num_timesteps - 1).astype(jnp.int32)
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)

  keep, weights = weighted_loss.example_weights(weights, batch)
  x0 = weighted_loss.drop_examples(x0, keep)

  x_t = sched_lib.q_sample(schedule, x0, t, noise)
  target = sched_lib.target_for(schedule, x0, noise, t, prediction_type)
  snr_scale = min_snr_weight(schedule, t, prediction_type, snr_gamma) if snr_gamma > 0 else None
  loss, parts = weighted_loss.mse(model_fn(x_t, t), target, keep, weights, snr_scale)
  aux = {
      'loss_per_example': parts['loss_per_example'],
      'timesteps': t,
      'mean_t': jnp.sum(weights * t.astype(jnp.float32)) / parts['denom'],
      'weight_sum': parts['weight_sum'],
  }
  return loss, aux


def min_snr_weight(schedule: sched_lib.NoiseSchedule, t: jax.Array, prediction_type: str,
                   gamma: float) -> jax.Array:
  """Per-example Min-SNR-γ loss weight: min(SNR_t, γ) expressed for the error of `prediction_type`.

  The ε error is the x_0 error scaled by SNR, the v error by SNR + 1, so their weights divide by those factors
  (as diffusers' `compute_snr` training scripts do); for 'sample' the weight is min(SNR, γ) itself.
  """
  a = schedule.alphas_cumprod[t].astype(jnp.float32)
  snr = a / jnp.maximum(1.0 - a, 1e-12)
  if prediction_type == 'epsilon':
    return jnp.where(snr > gamma, gamma / jnp.maximum(snr, 1e-12), 1.0)  # 1, not 0/0, at SNR = 0
  clipped = jnp.minimum(snr, gamma)
  if prediction_type == 'v_prediction':
    return clipped / (snr + 1.0)
  return clipped
