"""Contrastive image–text losses over the whole global batch.

Both losses take the embeddings of the *global* batch. Inside the jitted train step the embeddings are sharded
along the batch axis over every data-parallel device, and `img @ txt.T` makes XLA gather the other devices' text
embeddings, so every image is contrasted with every caption of the global batch — the loss on 8 devices is the
loss on 1 device (tested). The B×B logits are the cost; a chunked/ring formulation is only needed for batches
far beyond what fits here.

Rows with `valid = 0` (unreadable images, padding) take part in neither the positives nor the negatives.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

_NEG = -1e9  # logit of a masked-out pair; finite so 0 * _NEG stays 0 in the gradient


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def _valid(valid: Optional[jax.Array], n: int) -> jax.Array:
  return jnp.ones((n,), jnp.float32) if valid is None else valid.astype(jnp.float32)


def similarity_logits(image_emb, text_emb, scale, bias=None) -> jax.Array:
  """scale · cos(image_i, text_j) (+ bias) for every pair: [B_images, B_texts]."""
  logits = scale * (l2_normalize(image_emb) @ l2_normalize(text_emb).T)
  return logits if bias is None else logits + bias


def clip_loss(image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array,
              valid: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
  """Symmetric softmax InfoNCE of the CLIP paper: mean of image→text and text→image cross-entropies."""
  logits = similarity_logits(image_emb, text_emb, scale)
  v = _valid(valid, logits.shape[0])
  pair_ok = v[:, None] * v[None, :]
  logits = jnp.where(pair_ok > 0, logits, _NEG)
  diag = jnp.diagonal(logits)
  n = jnp.maximum(jnp.sum(v), 1.0)
  loss_i2t = jnp.sum(v * (jax.nn.logsumexp(logits, axis=1) - diag)) / n
  loss_t2i = jnp.sum(v * (jax.nn.logsumexp(logits, axis=0) - diag)) / n
  correct = (jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0])).astype(jnp.float32)
  metrics = {"loss_i2t": loss_i2t, "loss_t2i": loss_t2i, "batch_i2t_accuracy": jnp.sum(v * correct) / n}
  return 0.5 * (loss_i2t + loss_t2i), metrics


def siglip_loss(image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array, bias: jax.Array,
                valid: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
  """SigLIP's pairwise sigmoid loss (Zhai et al. 2023): every pair is a binary match/no-match decision.

  Normalised like the paper, by the number of (valid) images rather than the number of pairs.
  """
  logits = similarity_logits(image_emb, text_emb, scale, bias)
  v = _valid(valid, logits.shape[0])
  pair_ok = v[:, None] * v[None, :]
  sign = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
  n = jnp.maximum(jnp.sum(v), 1.0)
  loss = -jnp.sum(pair_ok * jax.nn.log_sigmoid(sign * logits)) / n
  pos = jnp.sum(v * jnp.diagonal(logits)) / n
  neg = jnp.sum(pair_ok * (1 - jnp.eye(logits.shape[0])) * logits) / jnp.maximum(n * (n - 1), 1.0)
  return loss, {"mean_positive_logit": pos, "mean_negative_logit": neg}
