"""A small VAE as a generative model (Kingma & Welling 2014): x → q(z|x) = N(μ, σ²) → decoder outputs per pixel.

Unlike `models.vae` (Stable Diffusion's autoencoder, whose spatial latents another model learns to sample), the
latent here is one vector per image drawn from the prior N(0, I) itself. Encoder: stride-2 3×3 convs (one per
`conv_widths` entry), flattened, dense layers (`hidden`), then μ and log σ². Decoder: the mirror image, dense
layers to a (size / 2^levels)² feature map and one ×2 transposed conv per level; `conv_widths=()` is the MLP VAE of
the original paper. A conditional VAE (`num_classes` > 0; Sohn et al. 2015) feeds the label's one-hot to every
dense layer of both (an unknown label, < 0, is all zeros): given only at the first layer, the label's path was weak
enough that the latent learned the digit too, and prior samples often showed another digit than the one asked for.

What the decoder's outputs mean (a Bernoulli logit or a Gaussian mean per pixel) is the task's business (`tasks.vae`,
`models.likelihoods`); `learned_scale` adds the one parameter a Gaussian decoder with a learned variance needs, a
log σ per channel shared by every pixel (the calibrated decoder of Rybkin et al. 2021: a per-pixel σ would chase the
zero-variance background of digits instead of learning the noise level).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers
from diffusion_jax.models.vae import DiagonalGaussian


@dataclasses.dataclass(frozen=True)
class ConvVAEConfig:
  image_size: int = 28
  channels: int = 1
  conv_widths: Sequence[int] = (32, 64)  # stride-2 levels; () = an MLP VAE
  hidden: Sequence[int] = (256,)  # dense layers between the flattened features and the latent
  latent_dim: int = 16
  num_classes: int = 0  # > 0: conditional on the label
  learned_scale: bool = False  # a learned log σ per channel, shared by every pixel (a Gaussian decoder's)
  dtype: Any = None  # compute dtype (params stay float32)

  def __post_init__(self):
    levels = len(self.conv_widths)
    if self.image_size % 2 ** levels:
      raise ValueError(f"the image size {self.image_size} is not a multiple of 2^{levels} for {levels} stride-2 "
                       "conv levels")
    if self.latent_dim < 1 or min((*self.conv_widths, *self.hidden), default=1) < 1:
      raise ValueError(f"latent_dim, conv_widths and hidden must be >= 1, got {self.latent_dim}, "
                       f"{tuple(self.conv_widths)}, {tuple(self.hidden)}")

  @property
  def bottom(self) -> tuple[int, int]:
    """(side, channels) of the feature map between the convs and the dense layers."""
    channels = self.conv_widths[-1] if self.conv_widths else self.channels
    return self.image_size // 2 ** len(self.conv_widths), channels


def _axes(i: int) -> tuple[str, str]:
  # Alternate the logical names so consecutive kernels never shard both dims along one mesh axis.
  return ("embed", "mlp") if i % 2 == 0 else ("mlp", "embed")


def _dense_stack(dims: Sequence[int], cfg: ConvVAEConfig, rngs: nnx.Rngs) -> nnx.List:
  """Dense layers dims[0] → dims[1] → ..., each also taking the label's one-hot."""
  return nnx.List([layers.dense(a + cfg.num_classes, b, _axes(i), rngs=rngs, dtype=cfg.dtype)
                   for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))])


def _with_label(h: jax.Array, labels, num_classes: int) -> jax.Array:
  if not num_classes:
    return h
  return jnp.concatenate([h, jax.nn.one_hot(labels, num_classes, dtype=h.dtype)], axis=-1)


class Encoder(nnx.Module):

  def __init__(self, cfg: ConvVAEConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    widths = (cfg.channels, *cfg.conv_widths)
    self.convs = nnx.List([layers.conv(a, b, 3, strides=2, rngs=rngs, dtype=cfg.dtype)
                           for a, b in zip(widths[:-1], widths[1:])])
    side, ch = cfg.bottom
    dims = (side * side * ch, *cfg.hidden)
    self.dense = _dense_stack(dims, cfg, rngs)
    self.moments = layers.dense(dims[-1] + cfg.num_classes, 2 * cfg.latent_dim, ("mlp", None), rngs=rngs,
                                dtype=cfg.dtype)

  def __call__(self, x: jax.Array, labels=None) -> DiagonalGaussian:
    h = x
    for conv in self.convs:
      h = jax.nn.silu(conv(h))
    h = h.reshape(h.shape[0], -1)
    k = self.cfg.num_classes
    for layer in self.dense:
      h = jax.nn.silu(layer(_with_label(h, labels, k)))
    # exp(logvar), the KL and log q(z|x) are where low precision hurts; they are small, so float32.
    return DiagonalGaussian.from_moments(self.moments(_with_label(h, labels, k)).astype(jnp.float32))


class Decoder(nnx.Module):

  def __init__(self, cfg: ConvVAEConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    side, ch = cfg.bottom
    out = cfg.channels  # one output (a logit or a mean) per pixel and channel
    dims = (cfg.latent_dim, *reversed(cfg.hidden))
    self.dense = _dense_stack(dims, cfg, rngs)
    self.project = layers.dense(dims[-1] + cfg.num_classes, side * side * (ch if cfg.conv_widths else out),
                                _axes(len(dims) - 1), rngs=rngs, dtype=cfg.dtype)
    # (64, 32) → 64 → 32 → out: each ×2 step narrows to the next encoder width down, the last to the outputs.
    widths = (*reversed(cfg.conv_widths), out)
    self.up = nnx.List([layers.conv_transpose(a, b, 4, strides=2, rngs=rngs, dtype=cfg.dtype)
                        for a, b in zip(widths[:-1], widths[1:])])

  def __call__(self, z: jax.Array, labels=None) -> jax.Array:
    """[B, size, size, channels] float32."""
    h, k = z, self.cfg.num_classes
    for layer in self.dense:
      h = jax.nn.silu(layer(_with_label(h, labels, k)))
    h = self.project(_with_label(h, labels, k))
    side = self.cfg.bottom[0]
    h = h.reshape(h.shape[0], side, side, -1)
    for i, up in enumerate(self.up):
      h = up(h) if i == len(self.up) - 1 else jax.nn.silu(up(h))
    return h.astype(jnp.float32)


class ConvVAE(nnx.Module):
  """`encode(x, labels) -> q(z|x)`, `decode(z, labels) -> per-pixel outputs`; x NHWC in [-1, 1]."""

  def __init__(self, cfg: ConvVAEConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)
    self.log_scale = (nnx.Param(nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",))(
        rngs.params(), (cfg.channels,))) if cfg.learned_scale else None)

  def encode(self, x: jax.Array, labels=None) -> DiagonalGaussian:
    return self.encoder(x, labels)

  def decode(self, z: jax.Array, labels=None) -> jax.Array:
    return self.decoder(z, labels)
