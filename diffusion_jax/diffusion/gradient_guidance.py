"""Guidance by the gradient of a score of the noisy image: classifier guidance (Dhariwal & Nichol 2021, "Diffusion
Models Beat GANs", Algorithm 2 / eq. 14) and CLIP guidance on the predicted x_0 (GLIDE's and "semantic diffusion
guidance"'s clean-CLIP variant), beside classifier-free guidance (`samplers.classifier_free_guidance`).

Both shift the model's epsilon along the gradient of a per-example log-score:

  eps' = eps - s * sqrt(1 - alpha_bar_t) * grad_x log p(y | x_t)

and hand the sampler the output of the model's own parameterisation that implies eps' (and the x_0 that goes with
it), so every sampler whose model sees x_VP at an integer time step is guided without knowing it.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import schedules as sched_lib
from diffusion_jax.diffusion.samplers import alpha_bar_at

# samplers whose model_fn gets x_VP at integer time steps (the Euler family's are fractional, the flow has no
# alpha_bar): the ones the shift above applies to as written.
GUIDED_SAMPLERS = ('ddim', 'ddpm', 'dpmpp_2m', 'unclip')

# score_fn(x_t, t, x0_hat) -> [B] log-scores; x0_hat is the model's x_0 estimate, which depends on x_t through
# x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) with the model's epsilon held fixed (no backward pass through it).
ScoreFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def check_sampler(sampler: str) -> None:
  if sampler not in GUIDED_SAMPLERS:
    raise ValueError(f'gradient guidance needs a sampler whose model sees x_t at integer time steps, one of '
                     f'{GUIDED_SAMPLERS}; got {sampler!r}')


def gradient_guidance(model_fn, schedule: sched_lib.NoiseSchedule, score_fn: ScoreFn, scale,
                      prediction_type: str, *, through_model: bool = False):
  """Wraps `model_fn(x, t)` so that its epsilon moves up the gradient of `score_fn` by `scale` (a scalar or [B]:
  0 leaves a row unguided). `through_model` differentiates the x_0 estimate through the model too (one backward pass
  of it per step) instead of holding the model's epsilon fixed."""

  def guided(x, t):
    alpha_bar = alpha_bar_at(schedule, t).reshape((-1,) + (1,) * (x.ndim - 1))
    sqrt_a, sqrt_b = jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)

    def score_at(x_in, eps):
      return jnp.sum(score_fn(x_in, t, (x_in - sqrt_b * eps) / sqrt_a))

    def eps_of(out, x_in):
      return sched_lib.x0_and_eps(out.astype(jnp.float32), x_in, alpha_bar, prediction_type)[1]

    x32 = x.astype(jnp.float32)
    if through_model:
      def through(x_in):
        out = model_fn(x_in.astype(x.dtype), t)
        eps = eps_of(out, x_in)
        return score_at(x_in, eps), (out, eps)

      grad, (out, eps_fixed) = jax.grad(through, has_aux=True)(x32)
      eps_fixed = jax.lax.stop_gradient(eps_fixed)
    else:
      # The model runs outside the gradient: no backward pass (or saved activations) of it.
      out = model_fn(x, t)
      eps_fixed = eps_of(out, x32)
      grad = jax.grad(score_at)(x32, eps_fixed)
    s = jnp.asarray(scale, jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    eps = eps_fixed - s * sqrt_b * grad
    x0 = (x - sqrt_b * eps) / sqrt_a
    return sched_lib.output_for(x0, eps, alpha_bar, prediction_type).astype(out.dtype)

  return guided


def classifier_score(classifier: Callable[[jax.Array, jax.Array], jax.Array], labels: jax.Array) -> ScoreFn:
  """log p(label | x_t, t) of a noise-aware classifier `classifier(x_t, t) -> logits`; rows with label < 0 score 0
  (unguided)."""

  def score(x, t, x0_hat):
    del x0_hat
    logp = jax.nn.log_softmax(classifier(x, t).astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
    return jnp.where(labels >= 0, picked, 0.0)

  return score


def clip_score(embed_images: Callable[[jax.Array], jax.Array], text_embeddings: jax.Array, *, cutouts: int = 0,
               rng: jax.Array | None = None) -> ScoreFn:
  """Cosine similarity between the CLIP embedding of the predicted x_0 (clipped to [-1, 1]) and each row's caption
  embedding; `cutouts` > 0 averages it over that many random crops (each 50–100% of the side, resized back), which
  keeps the gradient from fitting one view of the image (GLIDE's and Disco Diffusion's remedy)."""
  text = text_embeddings / jnp.linalg.norm(text_embeddings, axis=-1, keepdims=True)

  def cosine(images):
    e = embed_images(images).astype(jnp.float32)
    e = e / jnp.linalg.norm(e, axis=-1, keepdims=True)
    return jnp.sum(e * text, axis=-1)

  def score(x, t, x0_hat):
    del x, t
    images = jnp.clip(x0_hat, -1.0, 1.0)
    if not cutouts:
      return cosine(images)
    return jnp.mean(jnp.stack([cosine(_cutout(images, k)) for k in jax.random.split(rng, cutouts)]), axis=0)

  return score


def _cutout(images: jax.Array, rng: jax.Array) -> jax.Array:
  """One random square crop per call (shared by the batch) of 50–100% of the side, resized back to full size."""
  b, h, w, c = images.shape
  k_size, k_y, k_x = jax.random.split(rng, 3)
  frac = jax.random.uniform(k_size, (), minval=0.5, maxval=1.0)
  y0 = jax.random.uniform(k_y, ()) * (1.0 - frac)
  x0 = jax.random.uniform(k_x, ()) * (1.0 - frac)
  # A crop and resize as one affine resampling: output pixel i reads input y0 * h + frac * i.
  return jax.image.scale_and_translate(images, (b, h, w, c), (1, 2), jnp.stack([1.0 / frac, 1.0 / frac]),
                                       jnp.stack([-y0 * h / frac, -x0 * w / frac]), 'linear')
