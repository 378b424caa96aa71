"""Log-likelihoods of a VAE's decoder and the bounds on log p(x) built from them, in nats.

Bernoulli: pixels in [0, 1] (binary images; grey levels act as soft targets, a cross-entropy rather than a density).
Discretized Gaussian: 8-bit pixels on the 256 levels k/127.5 - 1 of [-1, 1], each level's probability the Gaussian's
mass over its bin (width 2/255), the two end bins reaching to ±∞ (PixelCNN++ and DDPM's image decoder), so the
probabilities over the levels sum to 1 and log p(x) of an 8-bit image is a true log-probability.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr

LOG_2PI = math.log(2 * math.pi)


def _event_sum(x: jax.Array, event_dims: int) -> jax.Array:
  return jnp.sum(x, axis=tuple(range(x.ndim - event_dims, x.ndim)))


def bernoulli_log_prob(x: jax.Array, logits: jax.Array, event_dims: int = 3) -> jax.Array:
  """Σ x·log σ(l) + (1 - x)·log σ(-l) over the last `event_dims` axes, for x in [0, 1]."""
  x = x.astype(jnp.float32)
  logits = logits.astype(jnp.float32)
  return _event_sum(x * jax.nn.log_sigmoid(logits) + (1.0 - x) * jax.nn.log_sigmoid(-logits), event_dims)


def _log1mexp(d: jax.Array) -> jax.Array:
  """log(1 - e^d) for d <= 0, accurate at both ends (Mächler 2012)."""
  d = jnp.minimum(d, -1e-30)
  return jnp.where(d > -math.log(2.0), jnp.log(-jnp.expm1(d)), jnp.log1p(-jnp.exp(d)))


def discretized_gaussian_log_prob(x: jax.Array, mean: jax.Array, log_scale: jax.Array, *, levels: int = 256,
                                  event_dims: int = 3) -> jax.Array:
  """Σ log P(x) over the last `event_dims` axes, x on `levels` evenly spaced values of [-1, 1], under
  N(mean, exp(log_scale)²) integrated over each value's bin (see the module docstring).

  log(Φ(u) - Φ(l)) is formed from log Φ of the bin edge further into the tail (reflected, Φ(u) - Φ(l) =
  Φ(-l) - Φ(-u), when the bin lies above the mean), so neither a far bin nor a narrow one cancels to log 0.
  """
  x, mean = x.astype(jnp.float32), mean.astype(jnp.float32)
  half = 1.0 / (levels - 1)
  inv_scale = jnp.exp(-log_scale.astype(jnp.float32))
  upper = (x - mean + half) * inv_scale
  lower = (x - mean - half) * inv_scale
  above = upper + lower > 0
  hi, lo = jnp.where(above, -lower, upper), jnp.where(above, -upper, lower)  # hi > lo, lo < 0
  log_hi = log_ndtr(hi)
  inner = log_hi + _log1mexp(log_ndtr(lo) - log_hi)
  first, last = x < -1.0 + half, x > 1.0 - half
  log_p = jnp.where(first, log_ndtr(upper), jnp.where(last, log_ndtr(-lower), inner))
  return _event_sum(log_p, event_dims)


def standard_normal_log_prob(z: jax.Array, event_dims: int = 1) -> jax.Array:
  """log N(z; 0, I) summed over the last `event_dims` axes: the VAE's prior."""
  return _event_sum(-0.5 * (jnp.square(z.astype(jnp.float32)) + LOG_2PI), event_dims)


def importance_weighted_bound(log_weights: jax.Array) -> jax.Array:
  """log (1/K) Σ_k w_k over the leading axis, from log w_k = log p(x, z_k) - log q(z_k | x) (Burda et al. 2016's
  IWAE bound: a lower bound on log p(x) that rises with K; K = 1 is an unbiased estimate of the ELBO)."""
  k = log_weights.shape[0]
  return jax.nn.logsumexp(log_weights, axis=0) - math.log(k)


def bits_per_dim(nats: jax.Array, dims: int) -> jax.Array:
  """Nats per example → bits per dimension: nats / (dims · ln 2)."""
  return nats / (dims * math.log(2.0))
