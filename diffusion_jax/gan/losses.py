"""GAN objectives: each player's loss from the discriminator's logits, and the gradient penalties.

  'minimax'         Goodfellow et al.: D maximises log D(x) + log(1 - D(G(z))), G minimises log(1 - D(G(z))).
  'non_saturating'  the same D; G maximises log D(G(z)) instead, which has gradients where D rejects its samples.
  'wgan'            Arjovsky et al.: the critic maximises E f(x) - E f(G(z)), kept Lipschitz by clipping its weights
                    after every step (an optimizer section's `clip_weights`, `train.optimizer`); G maximises E f(G(z)).
  'wgan_gp'         Gulrajani et al.: the WGAN losses, Lipschitz by `gradient_penalty` (λ = 10) instead of clipping.
  'hinge'           Lim & Ye / Miyato et al.: D minimises relu(1 - D(x)) + relu(1 + D(G(z))); G maximises D(G(z)).
An optional R1 penalty (Mescheder et al. 2018), γ/2 · E‖∇D(x_real)‖², applies to any of them.

The discriminator's loss is written as a term on the logits of real rows and a term on the logits of negatives
(`real_term`, `fake_term`), so that a matching-aware discriminator (GAN-INT-CLS) averages two kinds of negatives:
generated images and real images with a mismatched caption (`mismatched_rows`). Every mean is weighted by the
batch's `valid` rows.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

LOSSES = ("minimax", "non_saturating", "wgan", "wgan_gp", "hinge")


def weighted_mean(x: jax.Array, weights: jax.Array) -> jax.Array:
  """The mean of `x` over rows weighted by `weights` (a padded or unreadable row with weight 0 counts for nothing)."""
  return jnp.sum(x * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def real_term(kind: str, logits: jax.Array, weights: jax.Array) -> jax.Array:
  """The discriminator's loss on rows it should call real."""
  if kind in ("minimax", "non_saturating"):
    per_row = jax.nn.softplus(-logits)  # -log σ(l)
  elif kind in ("wgan", "wgan_gp"):
    per_row = -logits
  elif kind == "hinge":
    per_row = jax.nn.relu(1.0 - logits)
  else:
    raise ValueError(f"unknown GAN loss {kind!r}; use one of {LOSSES}")
  return weighted_mean(per_row, weights)


def fake_term(kind: str, logits: jax.Array, weights: jax.Array) -> jax.Array:
  """The discriminator's loss on rows it should call fake (generated images, mismatched pairs)."""
  if kind in ("minimax", "non_saturating"):
    per_row = jax.nn.softplus(logits)  # -log(1 - σ(l))
  elif kind in ("wgan", "wgan_gp"):
    per_row = logits
  elif kind == "hinge":
    per_row = jax.nn.relu(1.0 + logits)
  else:
    raise ValueError(f"unknown GAN loss {kind!r}; use one of {LOSSES}")
  return weighted_mean(per_row, weights)


def generator_loss(kind: str, fake_logits: jax.Array, weights: jax.Array) -> jax.Array:
  """The generator's loss on the discriminator's logits of its samples."""
  if kind == "minimax":
    per_row = -jax.nn.softplus(fake_logits)  # log(1 - σ(l))
  elif kind == "non_saturating":
    per_row = jax.nn.softplus(-fake_logits)  # -log σ(l)
  elif kind in ("wgan", "wgan_gp", "hinge"):
    per_row = -fake_logits
  else:
    raise ValueError(f"unknown GAN loss {kind!r}; use one of {LOSSES}")
  return weighted_mean(per_row, weights)


def _input_grad_norms(critic: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
  """‖∂critic(x)_i/∂x_i‖ per row. The critic treats rows independently (no batch statistics), so the gradient of
  the summed logits with respect to the batch holds each row's own gradient."""
  grads = jax.grad(lambda v: jnp.sum(critic(v)))(x)
  return jnp.sqrt(jnp.sum(jnp.square(grads.reshape(x.shape[0], -1)), axis=-1) + 1e-12)


def gradient_penalty(critic: Callable[[jax.Array], jax.Array], real: jax.Array, fake: jax.Array, eps: jax.Array,
                     weights: jax.Array) -> jax.Array:
  """WGAN-GP's E (‖∇critic(x̂)‖ - 1)² at x̂ = eps·real + (1 - eps)·fake, eps [B] uniform in [0, 1] (drawn by the
  caller, so a test can recompute x̂)."""
  e = eps.reshape((-1,) + (1,) * (real.ndim - 1)).astype(real.dtype)
  interpolates = e * real + (1.0 - e) * fake
  return weighted_mean(jnp.square(_input_grad_norms(critic, interpolates) - 1.0), weights)


def r1_penalty(critic: Callable[[jax.Array], jax.Array], real: jax.Array, weights: jax.Array) -> jax.Array:
  """E ‖∇critic(x_real)‖² (the caller weighs it by γ/2)."""
  return weighted_mean(jnp.square(_input_grad_norms(critic, real)), weights)


def mismatched_rows(labels: jax.Array, weights: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """For each row, a random other row of the batch whose label differs (its caption is the row's mismatched
  caption), and whether one exists: (index [B] int32, found [B] float). Only valid rows are drawn."""
  n = labels.shape[0]
  allowed = (labels[:, None] != labels[None, :]) & (weights[None, :] > 0)
  scores = jnp.where(allowed, jax.random.uniform(rng, (n, n)), -1.0)
  return jnp.argmax(scores, axis=1).astype(jnp.int32), jnp.any(allowed, axis=1).astype(jnp.float32)
