"""Stable Diffusion's KL autoencoder (diffusers' `AutoencoderKL`) in Flax NNX.

The encoder maps NHWC images in [-1, 1] to a diagonal Gaussian over latents 2^(levels-1) times smaller; the decoder
maps latents back to images. Latent diffusion trains on `scale_latents(posterior.sample(rng))` and decodes
`unscale_latents(z)`. Submodule names mirror diffusers (`encoder.down_blocks.0.resnets.1.conv2`, ...) so a
diffusers `vae/` folder maps one to one (see `diffusion_jax.pretrained.vae`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers, remat
from diffusion_jax.models.attention import SpatialSelfAttention

# Every norm in the diffusers VAE (resnets, attention, conv_norm_out) uses this epsilon; it is not in its config.
_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2  # resnets per encoder level; the decoder has one more per level
  latent_channels: int = 4
  norm_num_groups: int = 32
  mid_block_attention: bool = True  # diffusers' `mid_block_add_attention`
  scaling_factor: float = 0.18215  # makes latents roughly unit-variance for the diffusion model
  shift_factor: Optional[float] = None  # subtracted before scaling (SD3/Flux); None: no shift
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  double_z: bool = True  # the encoder emits mean and log-variance; False: the latents themselves (VQModel)
  # 'spatial': the decoder's norms are MoVQ's SpatialNorm, modulated by the latents it decodes (Kandinsky's VQModel)
  norm_type: str = "group"
  dtype: Any = None  # compute dtype (params stay float32)
  attention_impl: Optional[str] = None  # None (attention.attend picks), 'host', 'xla' or 'cudnn'
  remat: str = "none"  # per resnet and attention block: 'none', 'full' or 'dots_saveable' (see models/remat.py)

  def __post_init__(self):
    remat.check(self.remat)
    if self.norm_type not in ("group", "spatial"):
      raise ValueError(f"norm_type must be 'group' or 'spatial', got {self.norm_type!r}")

  @property
  def spatial_channels(self) -> int:
    """The channels of the latents a spatial norm is conditioned on (0: plain group norms)."""
    return self.latent_channels if self.norm_type == "spatial" else 0

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


# Published architectures by name; scaling/shift factors are the ones their diffusers configs carry.
_VARIANTS = {
    "sd": {},  # SD 1.x / 2.x
    "sdxl": dict(scaling_factor=0.13025),
    "sd3": dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                use_post_quant_conv=False),
    "flux": dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                 use_post_quant_conv=False),
    # Small ones for tests and toy runs.
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8),
    "tiny3": dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=4),
}


def vae_config(name: str, **overrides) -> VAEConfig:
  """The `VAEConfig` of a named variant ('sd', 'sdxl', 'sd3', 'flux', 'tiny', 'tiny3'), with field overrides."""
  if name not in _VARIANTS:
    raise ValueError(f"unknown VAE variant {name!r}; known: {', '.join(sorted(_VARIANTS))}")
  return VAEConfig(**{**_VARIANTS[name], **overrides})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
  """The encoder's posterior q(z|x) = N(mean, exp(logvar)), a pytree so it can leave a jitted function."""
  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
    """Splits the last axis into (mean, logvar); logvar is clipped like diffusers so exp() can never overflow."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  def sample(self, rng: jax.Array) -> jax.Array:
    """A reparameterised draw, mean + std·ε, so gradients flow to the encoder."""
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def log_prob(self, z: jax.Array) -> jax.Array:
    """log q(z) per example, summed over the latent dims; `z` may carry leading sample axes ([K, B, ...]), as an
    importance-weighted bound draws several z per example."""
    axes = tuple(range(z.ndim - self.mean.ndim + 1, z.ndim))
    return -0.5 * jnp.sum(jnp.square(z - self.mean) / self.var + self.logvar + jnp.log(2 * jnp.pi), axis=axes)

  def kl(self, other: Optional["DiagonalGaussian"] = None) -> jax.Array:
    """KL(self ‖ other) per example, summed over all latent dims; `other=None` means N(0, I)."""
    axes = tuple(range(1, self.mean.ndim))
    if other is None:
      return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=axes)
    return 0.5 * jnp.sum(jnp.square(self.mean - other.mean) / other.var + self.var / other.var - 1.0
                         - self.logvar + other.logvar, axis=axes)


class SpatialNorm(nnx.Module):
  """MoVQ's norm (diffusers' `SpatialNorm`): a 32-group norm of the features, scaled and shifted per pixel by 1×1
  convolutions of the quantised latents, nearest-upsampled to the features' size."""

  def __init__(self, channels: int, zq_channels: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.norm_layer = layers.group_norm(channels, 32, epsilon=_EPS, rngs=rngs, dtype=cfg.dtype)
    self.conv_y = layers.conv(zq_channels, channels, 1, rngs=rngs, dtype=cfg.dtype)
    self.conv_b = layers.conv(zq_channels, channels, 1, rngs=rngs, dtype=cfg.dtype)

  def __call__(self, f, zq):
    scale = (f.shape[1] // zq.shape[1], f.shape[2] // zq.shape[2])
    zq = jnp.repeat(jnp.repeat(zq, scale[0], axis=1), scale[1], axis=2)
    return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)


def _norm(channels: int, cfg: VAEConfig, spatial: bool, *, rngs: nnx.Rngs):
  if spatial:
    return SpatialNorm(channels, cfg.spatial_channels, cfg, rngs=rngs)
  return layers.group_norm(channels, cfg.norm_num_groups, epsilon=_EPS, rngs=rngs, dtype=cfg.dtype)


class ResnetBlock(nnx.Module):
  """norm → SiLU → conv, twice, plus a (1×1-projected when widths differ) skip; no time embedding. With `spatial`
  (a MoVQ decoder's) both norms are `SpatialNorm`s of the quantised latents `zq`.

  Not the U-Net's `ResnetBlock2D`, whose time-embedding projection is a weight the VAE does not have.
  """

  def __init__(self, in_ch: int, out_ch: int, cfg: VAEConfig, *, rngs: nnx.Rngs, spatial: bool = False):
    dt = cfg.dtype
    self.norm1 = _norm(in_ch, cfg, spatial, rngs=rngs)
    self.conv1 = layers.conv(in_ch, out_ch, 3, rngs=rngs, dtype=dt)
    self.norm2 = _norm(out_ch, cfg, spatial, rngs=rngs)
    self.conv2 = layers.conv(out_ch, out_ch, 3, rngs=rngs, dtype=dt)
    self.conv_shortcut = layers.conv(in_ch, out_ch, 1, rngs=rngs, dtype=dt) if in_ch != out_ch else None
    self.spatial = spatial

  def __call__(self, x, zq=None):
    norm = (lambda n, h: n(h, zq)) if self.spatial else (lambda n, h: n(h))
    h = self.conv1(jax.nn.silu(norm(self.norm1, x)))
    h = self.conv2(jax.nn.silu(norm(self.norm2, h)))
    skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
    return skip + h


class AttentionBlock(SpatialSelfAttention):
  """Single-head self-attention over the H·W positions, with group norm (a MoVQ decoder's: `SpatialNorm`) in front
  and a residual around it."""

  def __init__(self, channels: int, cfg: VAEConfig, *, rngs: nnx.Rngs, spatial: bool = False):
    super().__init__(channels, groups=None if spatial else cfg.norm_num_groups, epsilon=_EPS, rngs=rngs,
                     dtype=cfg.dtype, implementation=cfg.attention_impl)
    self.spatial_norm = SpatialNorm(channels, cfg.spatial_channels, cfg, rngs=rngs) if spatial else None

  def __call__(self, x, zq=None):
    return super().__call__(x, None if self.spatial_norm is None else self.spatial_norm(x, zq))


class Downsample(nnx.Module):
  """Stride-2 3×3 conv after padding one zero row/column at the bottom/right only.

  The VAE's downsampler (diffusers `Downsample2D(padding=0)`) pads asymmetrically, unlike the U-Net's symmetric
  one, so pretrained encoders only see the pixels they were trained on with this padding.
  """

  def __init__(self, ch: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.conv = layers.conv(ch, ch, 3, strides=2, padding=((0, 1), (0, 1)), rngs=rngs, dtype=cfg.dtype)

  def __call__(self, x):
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest-neighbour ×2 followed by a 3×3 conv."""

  def __init__(self, ch: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.conv = layers.conv(ch, ch, 3, rngs=rngs, dtype=cfg.dtype)

  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)


class VAEBlock(nnx.Module):
  """One level: resnets, then an optional down- or upsampler (diffusers' Down/UpEncoder/DecoderBlock2D)."""

  def __init__(self, in_ch: int, out_ch: int, num_resnets: int, cfg: VAEConfig, *, resample: Optional[str],
               rngs: nnx.Rngs, spatial: bool = False):
    self.remat = cfg.remat
    self.resnets = nnx.List([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, cfg, rngs=rngs, spatial=spatial)
                             for i in range(num_resnets)])
    self.downsamplers = nnx.List([Downsample(out_ch, cfg, rngs=rngs)]) if resample == "down" else None
    self.upsamplers = nnx.List([Upsample(out_ch, cfg, rngs=rngs)]) if resample == "up" else None

  def __call__(self, x, zq=None):
    for resnet in self.resnets:
      x = remat.apply(resnet, self.remat, x, zq)
    for sampler in (self.downsamplers or ()):
      x = sampler(x)
    for sampler in (self.upsamplers or ()):
      x = sampler(x)
    return x


class MidBlock(nnx.Module):
  """resnet → (attention) → resnet at the lowest resolution."""

  def __init__(self, ch: int, cfg: VAEConfig, *, rngs: nnx.Rngs, spatial: bool = False):
    self.remat = cfg.remat
    self.resnets = nnx.List([ResnetBlock(ch, ch, cfg, rngs=rngs, spatial=spatial) for _ in range(2)])
    self.attentions = (nnx.List([AttentionBlock(ch, cfg, rngs=rngs, spatial=spatial)]) if cfg.mid_block_attention
                       else None)

  def __call__(self, x, zq=None):
    x = remat.apply(self.resnets[0], self.remat, x, zq)
    if self.attentions is not None:
      x = remat.apply(self.attentions[0], self.remat, x, zq)
    return remat.apply(self.resnets[1], self.remat, x, zq)


class Encoder(nnx.Module):
  """Images → 2·latent_channels moments (mean, logvar), or latent_channels latents without `double_z`, at
  1/downsample_factor resolution."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    chans, dt = tuple(cfg.block_out_channels), cfg.dtype
    self.conv_in = layers.conv(cfg.in_channels, chans[0], 3, rngs=rngs, dtype=dt)
    blocks, prev = [], chans[0]
    for i, ch in enumerate(chans):
      blocks.append(VAEBlock(prev, ch, cfg.layers_per_block, cfg,
                             resample="down" if i < len(chans) - 1 else None, rngs=rngs))
      prev = ch
    self.down_blocks = nnx.List(blocks)
    self.mid_block = MidBlock(chans[-1], cfg, rngs=rngs)
    self.conv_norm_out = layers.group_norm(chans[-1], cfg.norm_num_groups, epsilon=_EPS, rngs=rngs, dtype=dt)
    self.conv_out = layers.conv(chans[-1], (2 if cfg.double_z else 1) * cfg.latent_channels, 3, rngs=rngs, dtype=dt)

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """Latents → images; each level has layers_per_block + 1 resnets, mirroring the encoder's widths."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    chans, dt = tuple(reversed(cfg.block_out_channels)), cfg.dtype
    spatial = cfg.norm_type == "spatial"
    self.conv_in = layers.conv(cfg.latent_channels, chans[0], 3, rngs=rngs, dtype=dt)
    self.mid_block = MidBlock(chans[0], cfg, rngs=rngs, spatial=spatial)
    blocks, prev = [], chans[0]
    for i, ch in enumerate(chans):
      blocks.append(VAEBlock(prev, ch, cfg.layers_per_block + 1, cfg,
                             resample="up" if i < len(chans) - 1 else None, rngs=rngs, spatial=spatial))
      prev = ch
    self.up_blocks = nnx.List(blocks)
    self.conv_norm_out = _norm(chans[-1], cfg, spatial, rngs=rngs)
    self.conv_out = layers.conv(chans[-1], cfg.out_channels, 3, rngs=rngs, dtype=dt)
    self.spatial = spatial

  def __call__(self, z, zq=None):
    """(images, features): features are the input of `conv_out`, after the last norm and SiLU, where the
    autoencoder task's adaptive GAN weight takes gradients. A spatial-norm decoder needs the quantised latents `zq`
    its norms are modulated by."""
    if self.spatial and zq is None:
      raise ValueError("a spatial-norm (MoVQ) decoder needs the quantised latents zq")
    x = self.mid_block(self.conv_in(z), zq)
    for block in self.up_blocks:
      x = block(x, zq)
    features = jax.nn.silu(self.conv_norm_out(x, zq) if self.spatial else self.conv_norm_out(x))
    return self.conv_out(features), features


class AutoencoderKL(nnx.Module):
  """`vae(images_nhwc) -> (reconstruction, posterior)`; `encode`/`decode` for latent diffusion."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    dt, lc = cfg.dtype, cfg.latent_channels
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)
    self.quant_conv = layers.conv(2 * lc, 2 * lc, 1, rngs=rngs, dtype=dt) if cfg.use_quant_conv else None
    self.post_quant_conv = layers.conv(lc, lc, 1, rngs=rngs, dtype=dt) if cfg.use_post_quant_conv else None

  def encode(self, images: jax.Array) -> DiagonalGaussian:
    """Images NHWC in [-1, 1] → the posterior over (unscaled) latents, in float32."""
    moments = self.encoder(images)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    # exp(logvar) and the KL sum are where low precision hurts; the posterior is small, so keep it in float32.
    return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

  def decode(self, latents: jax.Array) -> jax.Array:
    """(Unscaled) latents NHWC → images NHWC, nominally in [-1, 1] (not clipped)."""
    return self.decode_with_features(latents)[0]

  def decode_with_features(self, latents: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`decode(latents)` and the input of the decoder's last conv (see `Decoder`), in one pass."""
    if self.post_quant_conv is not None:
      latents = self.post_quant_conv(latents)
    return self.decoder(latents)

  def __call__(self, images: jax.Array, rng: Optional[jax.Array] = None,
               sample_posterior: bool = False) -> tuple[jax.Array, DiagonalGaussian]:
    if sample_posterior and rng is None:
      raise ValueError("sample_posterior=True needs an rng")
    posterior = self.encode(images)
    z = posterior.sample(rng) if sample_posterior else posterior.mode()
    return self.decode(z), posterior

  def scale_latents(self, z: jax.Array) -> jax.Array:
    """VAE latents → the roughly unit-variance latents a diffusion model is trained on."""
    shift = self.config.shift_factor or 0.0
    return (z - shift) * self.config.scaling_factor

  def unscale_latents(self, z: jax.Array) -> jax.Array:
    """The inverse of `scale_latents`: diffusion-model latents → what `decode` expects."""
    shift = self.config.shift_factor or 0.0
    return z / self.config.scaling_factor + shift
