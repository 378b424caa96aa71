"""VQ-VAE / VQGAN image tokenizers (diffusers' `VQModel`, the latent-diffusion and taming layout) in Flax NNX.

The encoder and decoder are the KL autoencoder's (`models.vae`) with a single-width encoder output; between them a
1×1 `quant_conv` into the codebook's width, the nearest codebook entry per position (`VectorQuantizer`) and a 1×1
`post_quant_conv` back. `encode` gives the continuous latents before quantisation, `quantize` the codes and their
entries, `decode` quantises and decodes, as diffusers' `VQModel.decode` does. Submodule names mirror diffusers, so a
`VQModel` folder maps one to one (`diffusion_jax.pretrained.vae`).

With `gumbel=True` it is DALL-E's discrete VAE instead: `quant_conv` gives logits over the K codes at each position
(`encode`), training decodes the Gumbel-softmax relaxation Σ_k softmax((logits + g) / τ)_k · e_k (`relaxed`) and pays
KL(q ‖ uniform) for it, and inference takes the most likely code (`tokenize`); the codebook rows e_k are what a one-hot
code multiplies, so `decode_indices` works for both kinds.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers
from diffusion_jax.models.vae import Decoder, Encoder, VAEConfig


@dataclasses.dataclass(frozen=True)
class VQConfig(VAEConfig):
  latent_channels: int = 3
  double_z: bool = False
  num_vq_embeddings: int = 256  # codebook size K
  vq_embed_dim: Optional[int] = None  # codebook width; None: latent_channels
  beta: float = 0.25  # commitment weight (VQ-VAE's β)
  gumbel: bool = False  # DALL-E's dVAE: logits over the codes, Gumbel-softmax relaxation in training
  # > 0: the codebook is not a parameter but an exponential moving average of the encoder outputs assigned to each
  # code (VQ-VAE's appendix, Razavi et al.'s VQ-VAE-2), mutable state the training step carries
  ema_decay: float = 0.0
  # with the EMA: a code whose average assignments per step fall below this is restarted at a random encoder
  # output of the batch (Jukebox's dead-code restart); 0 = never
  restart_threshold: float = 0.0

  @property
  def code_dim(self) -> int:
    return self.vq_embed_dim or self.latent_channels


def nearest_codes(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """int32 indices [...] of the codebook row [K, D] nearest in Euclidean distance to each z [..., D].

  ‖z‖² − 2 z·e + ‖e‖² in float32: one matmul instead of a [N, K, D] difference tensor (‖z‖² does not change the
  argmin and is left out)."""
  z = z.astype(jnp.float32)
  e = codebook.astype(jnp.float32)
  scores = jnp.sum(e * e, axis=-1) - 2.0 * jnp.einsum("...d,kd->...k", z, e, precision=jax.lax.Precision.HIGHEST)
  return jnp.argmin(scores, axis=-1).astype(jnp.int32)


class CodebookState(nnx.Variable):
  """An EMA codebook's entries and running statistics: mutable state, not parameters."""


class VectorQuantizer(nnx.Module):
  """A codebook of `num` entries of width `dim` (diffusers' `VectorQuantizer`, its `embedding.weight`); with
  `ema_decay` > 0 the codebook follows the encoder outputs assigned to it (`update_ema`) instead of a loss."""

  def __init__(self, num: int, dim: int, *, rngs: nnx.Rngs, ema_decay: float = 0.0, restart_threshold: float = 0.0):
    # diffusers' (and taming's) initialisation: uniform in ±1/K
    init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -1.0 / num, 1.0 / num)
    self.embedding = nnx.Embed(num, dim, embedding_init=nnx.with_partitioning(init, ("vocab", "embed")), rngs=rngs)
    self.ema_decay, self.restart_threshold = float(ema_decay), float(restart_threshold)
    if self.ema_decay > 0:
      table = self.embedding.embedding
      self.embedding.embedding = CodebookState(table.get_value(), **table.get_metadata())
      self.cluster_size = CodebookState(jnp.zeros((num,), jnp.float32), out_sharding=("vocab",))
      self.embed_sum = CodebookState(table.get_value(), **table.get_metadata())

  @property
  def codebook(self) -> jax.Array:
    return self.embedding.embedding.get_value()

  def lookup(self, indices: jax.Array) -> jax.Array:
    """Codebook entries [..., D] of int indices [...]."""
    return jnp.take(self.codebook, indices, axis=0)

  def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(entries, indices) of the nearest codes to z [..., D]."""
    indices = nearest_codes(z, self.codebook)
    return self.lookup(indices).astype(z.dtype), indices

  def straight_through(self, z: jax.Array, weights: Optional[jax.Array] = None
                       ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(quantised z whose gradient passes to z unchanged, indices, codebook loss ‖sg[z] − e‖², commitment loss
    ‖z − sg[e]‖²), the losses as means over the rows of z [B, ..., D] weighted by `weights` [B] (VQ-VAE's; diffusers'
    legacy loss is their sum with β on the commitment term). The codebook loss is 0 with an EMA codebook."""
    e, indices = self(z)
    w = jnp.ones(z.shape[:1], jnp.float32) if weights is None else weights.astype(jnp.float32)
    per_row = lambda x: jnp.mean(jnp.square(x).reshape(x.shape[0], -1).astype(jnp.float32), axis=1)
    mean = lambda x: jnp.sum(per_row(x) * w) / jnp.maximum(jnp.sum(w), 1.0)
    codebook_loss = jnp.zeros((), jnp.float32) if self.ema_decay > 0 else mean(jax.lax.stop_gradient(z) - e)
    commitment = mean(z - jax.lax.stop_gradient(e))
    return z + jax.lax.stop_gradient(e - z), indices, codebook_loss, commitment

  def update_ema(self, z: jax.Array, indices: jax.Array, rng: jax.Array,
                 weights: Optional[jax.Array] = None) -> dict[str, jax.Array]:
    """One EMA step of the codebook towards the mean of the encoder outputs z [B, ..., D] assigned to each code
    (`indices` [B, ...]; rows weighted by `weights` [B]), with Laplace-smoothed counts, then the restart of dead
    codes; returns {'restarted': codes restarted}. Training only: it writes the mutable codebook state."""
    if self.ema_decay <= 0:
      raise ValueError("update_ema needs a VectorQuantizer built with ema_decay > 0")
    num, dim = self.embed_sum.shape
    flat = jax.lax.stop_gradient(z).reshape(-1, dim).astype(jnp.float32)
    idx = indices.reshape(-1)
    w = jnp.ones(z.shape[:1], jnp.float32) if weights is None else weights.astype(jnp.float32)
    w = jnp.broadcast_to(w.reshape((-1,) + (1,) * (indices.ndim - 1)), indices.shape).reshape(-1)
    counts = jax.ops.segment_sum(w, idx, num)
    sums = jax.ops.segment_sum(flat * w[:, None], idx, num)
    d = self.ema_decay
    cluster = d * self.cluster_size[...] + (1 - d) * counts
    embed_sum = d * self.embed_sum[...] + (1 - d) * sums
    total = jnp.sum(cluster)
    eps = 1e-5
    smoothed = (cluster + eps) / (total + num * eps) * total
    codebook = embed_sum / smoothed[:, None]
    restarted = jnp.zeros((), jnp.float32)
    if self.restart_threshold > 0:
      dead = cluster < self.restart_threshold
      # each dead code takes a random valid encoder output of this batch (the valid rows have weight > 0)
      pick = jax.random.categorical(rng, jnp.log(jnp.maximum(w, 1e-30)), shape=(num,))
      codebook = jnp.where(dead[:, None], flat[pick], codebook)
      embed_sum = jnp.where(dead[:, None], flat[pick] * self.restart_threshold, embed_sum)
      cluster = jnp.where(dead, self.restart_threshold, cluster)
      restarted = jnp.sum(dead.astype(jnp.float32))
    self.cluster_size[...] = cluster
    self.embed_sum[...] = embed_sum
    self.embedding.embedding[...] = codebook.astype(self.embedding.embedding.dtype)
    return {"restarted": restarted}


class VQModel(nnx.Module):
  """`vq(images) -> (reconstruction, indices)`; `encode`, `quantize(latents) -> (entries, int32 indices [B, h, w])`,
  `decode`, `tokenize` and `decode_indices` for image tokens."""

  def __init__(self, cfg: VQConfig, *, rngs: nnx.Rngs):
    if cfg.double_z:
      raise ValueError("a VQModel's encoder emits the latents themselves: VQConfig.double_z must be False")
    if cfg.gumbel and cfg.ema_decay > 0:
      raise ValueError("a Gumbel-softmax dVAE learns its codebook by gradient: VQConfig.ema_decay must be 0")
    self.config = cfg
    dt, lc, cd = cfg.dtype, cfg.latent_channels, cfg.code_dim
    self.encoder = Encoder(cfg, rngs=rngs)
    self.quant_conv = layers.conv(lc, cfg.num_vq_embeddings if cfg.gumbel else cd, 1, rngs=rngs, dtype=dt)
    self.quantize = VectorQuantizer(cfg.num_vq_embeddings, cd, rngs=rngs, ema_decay=cfg.ema_decay,
                                    restart_threshold=cfg.restart_threshold)
    self.post_quant_conv = layers.conv(cd, lc, 1, rngs=rngs, dtype=dt)
    self.decoder = Decoder(cfg, rngs=rngs)

  @property
  def downsample_factor(self) -> int:
    return self.config.downsample_factor

  def encode(self, images: jax.Array) -> jax.Array:
    """Images NHWC in [-1, 1] → continuous latents [B, h, w, code_dim] before quantisation (logits [B, h, w, K] over
    the codes with `gumbel`)."""
    return self.quant_conv(self.encoder(images))

  def codes(self, latents: jax.Array) -> jax.Array:
    """int32 codes [B, h, w] of `encode`'s output: the nearest codebook row, or the most likely code."""
    if self.config.gumbel:
      return jnp.argmax(latents, axis=-1).astype(jnp.int32)
    return self.quantize(latents)[1]

  def relaxed(self, logits: jax.Array, rng: jax.Array, temperature) -> tuple[jax.Array, jax.Array]:
    """(Σ_k y_k e_k with y = softmax((logits + Gumbel noise) / temperature) [B, h, w, D], KL(softmax(logits) ‖
    uniform) summed over the positions of each image [B]), in float32: the dVAE's training path."""
    logits = logits.astype(jnp.float32)
    y = jax.nn.softmax((logits + jax.random.gumbel(rng, logits.shape)) / temperature, axis=-1)
    q = jax.nn.softmax(logits, axis=-1)
    kl = jnp.sum(q * (jax.nn.log_softmax(logits, axis=-1) + jnp.log(float(logits.shape[-1]))), axis=-1)
    return y @ self.quantize.codebook.astype(jnp.float32), jnp.sum(kl.reshape(kl.shape[0], -1), axis=1)

  def decode_quantized(self, quantized: jax.Array) -> jax.Array:
    return self.decode_with_features(quantized)[0]

  def decode_with_features(self, quantized: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(images, the input of the decoder's last conv) of quantised latents [B, h, w, D] (or a dVAE's relaxation)."""
    spatial = self.config.norm_type == "spatial"  # MoVQ: the norms are modulated by the quantised latents
    return self.decoder(self.post_quant_conv(quantized), quantized if spatial else None)

  def decode(self, latents: jax.Array, *, force_not_quantize: bool = False) -> jax.Array:
    """Latents [B, h, w, D] → images NHWC (quantised first unless `force_not_quantize`, as diffusers); a dVAE's
    logits decode their most likely codes."""
    if self.config.gumbel:
      return self.decode_indices(self.codes(latents))
    return self.decode_quantized(latents if force_not_quantize else self.quantize(latents)[0])

  def decode_indices(self, indices: jax.Array) -> jax.Array:
    """int indices [B, h, w] → images NHWC."""
    return self.decode_quantized(self.quantize.lookup(indices))

  def tokenize(self, images: jax.Array) -> jax.Array:
    """Images → int32 code indices [B, h, w]: the image tokens of DALL-E-style models."""
    return self.codes(self.encode(images))

  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    indices = self.tokenize(images)
    return self.decode_indices(indices), indices
