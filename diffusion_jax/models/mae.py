"""Masked autoencoder (MAE, He et al. 2021) on the shared ViT tower, laid out as transformers' `ViTMAEForPreTraining`.

Each image's patches are shuffled by the argsort of per-example noise; the encoder (`models.vit.CLIPVisionModel`
with a class token and fixed sin-cos positions) sees only the first `1 - mask_ratio` of them; a narrower decoder
puts the encoded tokens back in place among learned mask tokens, adds its own fixed positions and predicts every
patch's pixels. The loss is the mean squared error over the masked patches, against the pixels or, with
`norm_pix_loss`, against each patch normalised by its own mean and (unbiased) variance.

  mae = MAE(cfg, rngs=nnx.Rngs(0))
  loss, pred, mask = mae(pixels_nhwc, noise=noise)   # pred [B, N, p²·C], mask [B, N] (1 = masked)
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers
from diffusion_jax.models.transformer import BlockConfig, TransformerBlock
from diffusion_jax.models.vit import CLIPVisionConfig, CLIPVisionModel, FixedPositions, sincos_positions


@dataclasses.dataclass(frozen=True)
class MAEConfig:
  """The encoder is a ViT tower with a class token and fixed positions; the decoder is sized on its own."""
  encoder: CLIPVisionConfig
  decoder_width: int = 512
  decoder_layers: int = 8
  decoder_heads: int = 16
  decoder_mlp_dim: int = 2048
  mask_ratio: float = 0.75
  norm_pix_loss: bool = False

  def __post_init__(self):
    e = self.encoder
    if e.pooling != "cls" or not e.fixed_positions:
      raise ValueError("an MAE encoder has a class token (pooling='cls') and fixed positions (fixed_positions=True)")
    if not 0.0 <= self.mask_ratio < 1.0:
      raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
    if self.visible_patches < 1:
      raise ValueError(f"mask_ratio {self.mask_ratio} leaves no visible patch of {self.num_patches}")
    self.decoder_block()

  @property
  def num_patches(self) -> int:
    return self.encoder.grid ** 2

  @property
  def visible_patches(self) -> int:
    return int(self.num_patches * (1 - self.mask_ratio))  # transformers' and MAE's rounding

  @property
  def patch_dim(self) -> int:
    return self.encoder.patch_size ** 2 * self.encoder.channels

  def decoder_block(self) -> BlockConfig:
    e = self.encoder
    try:
      return BlockConfig(width=self.decoder_width, heads=self.decoder_heads, mlp_dim=self.decoder_mlp_dim, act=e.act,
                         eps=e.layer_norm_eps, init="clip", depth=self.decoder_layers, dtype=e.dtype,
                         attention_impl=e.attention_impl)
    except ValueError as err:
      raise ValueError(f"MAE decoder {err}") from None


def patchify(pixels: jax.Array, patch: int) -> jax.Array:
  """NHWC images → [B, N, p·p·C] patches, row-major, each patch's pixels row by row, channels last (MAE's order)."""
  b, h, w, c = pixels.shape
  x = pixels.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, channels: int) -> jax.Array:
  """`patchify`'s inverse for square images."""
  b, n, _ = patches.shape
  g = int(round(n ** 0.5))
  x = patches.reshape(b, g, g, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, g * patch, g * patch, channels)


def shuffle(noise: jax.Array, keep: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(indices of the kept patches [B, keep], mask [B, N] with 1 on the others, the permutation's inverse [B, N]) of
  a per-example random shuffle: the patches of lowest noise are kept."""
  order = jnp.argsort(noise, axis=1)
  restore = jnp.argsort(order, axis=1)
  mask = (restore >= keep).astype(jnp.float32)
  return order[:, :keep], mask, restore


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array, norm_pix: bool) -> jax.Array:
  """Per-patch mean squared error [B, N]; `norm_pix` normalises each target patch first (unbiased variance)."""
  if norm_pix:
    mean = jnp.mean(target, axis=-1, keepdims=True)
    var = jnp.var(target, axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1) * mask


class MAE(nnx.Module):
  """`mae(pixels NHWC, *, noise=None, rng=None) -> (loss, pred [B, N, p²·C], mask [B, N])`.

  `noise` [B, N] decides the masking (the lowest `visible_patches` are kept); without it `rng` draws it uniformly.
  """

  def __init__(self, cfg: MAEConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    e, d, dt = cfg.encoder, cfg.decoder_width, cfg.encoder.dtype
    self.vision_model = CLIPVisionModel(e, rngs=rngs)
    self.decoder_embed = layers.dense(e.width, d, ("embed", None), rngs=rngs, dtype=dt)
    self.mask_token = nnx.Param(nnx.with_partitioning(nnx.initializers.normal(0.02), (None,))(rngs.params(), (d,)))
    self.decoder_pos_embed = FixedPositions(jnp.asarray(sincos_positions(d, e.grid)), out_sharding=(None, None))
    block = cfg.decoder_block()
    self.decoder_layers = nnx.List([TransformerBlock(block, rngs=rngs) for _ in range(cfg.decoder_layers)])
    self.decoder_norm = layers.layer_norm(d, epsilon=e.layer_norm_eps, rngs=rngs, dtype=dt)
    self.decoder_pred = layers.dense(d, cfg.patch_dim, (None, None), rngs=rngs, dtype=dt)

  def encode(self, pixels: jax.Array, noise: jax.Array,
             rng: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(final-normed states of the class token and the kept patches [B, 1 + keep, W], mask, inverse permutation)."""
    tokens = self.vision_model.embed(pixels)
    if noise.shape != tokens.shape[:1] + (self.config.num_patches,):
      raise ValueError(f"noise must be [batch, {self.config.num_patches}], got {noise.shape}")
    kept, mask, restore = shuffle(noise, self.config.visible_patches)
    visible = jnp.take_along_axis(tokens[:, 1:], kept[..., None], axis=1)
    _, x = self.vision_model.run_layers(jnp.concatenate([tokens[:, :1], visible], axis=1), rng=rng)
    return self.vision_model.post_layernorm(x), mask, restore

  def decode(self, latent: jax.Array, restore: jax.Array) -> jax.Array:
    """Every patch's predicted pixels [B, N, p²·C] (float32) from `encode`'s states."""
    x = self.decoder_embed(latent)
    b, n = restore.shape
    masked = jnp.broadcast_to(self.mask_token[...].astype(x.dtype), (b, n + 1 - x.shape[1], x.shape[-1]))
    patches = jnp.take_along_axis(jnp.concatenate([x[:, 1:], masked], axis=1), restore[..., None], axis=1)
    x = jnp.concatenate([x[:, :1], patches], axis=1) + jnp.asarray(self.decoder_pos_embed[...]).astype(x.dtype)
    for layer in self.decoder_layers:
      x = layer(x)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:].astype(jnp.float32)

  def __call__(self, pixels: jax.Array, *, noise: Optional[jax.Array] = None, rng: Optional[jax.Array] = None,
               weights: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`weights` [B] weigh each row's masked patches in the loss (0 for a batch's padding rows)."""
    if noise is None:
      if rng is None:
        raise ValueError("pass the masking noise or an rng to draw it")
      noise_rng, rng = jax.random.split(rng)
      noise = jax.random.uniform(noise_rng, (pixels.shape[0], self.config.num_patches))
    latent, mask, restore = self.encode(pixels, noise, rng)
    pred = self.decode(latent, restore)
    target = patchify(pixels.astype(jnp.float32), self.config.encoder.patch_size)
    if weights is None:
      per_patch = masked_mse(pred, target, mask, self.config.norm_pix_loss)
      return jnp.sum(per_patch) / jnp.sum(mask), pred, mask
    counted = mask * weights[:, None]
    per_patch = masked_mse(pred, target, counted, self.config.norm_pix_loss)
    return jnp.sum(per_patch) / jnp.maximum(jnp.sum(counted), 1.0), pred, mask

  def reconstruct(self, pixels: jax.Array, pred: jax.Array, mask: jax.Array) -> jax.Array:
    """NHWC images with the masked patches replaced by `pred` (un-normalised with each true patch's statistics when
    the model predicts normalised pixels), the visible ones kept: what MAE's figures show."""
    patch = self.config.encoder.patch_size
    target = patchify(pixels.astype(jnp.float32), patch)
    if self.config.norm_pix_loss:
      mean = jnp.mean(target, axis=-1, keepdims=True)
      pred = pred * jnp.sqrt(jnp.var(target, axis=-1, keepdims=True, ddof=1) + 1e-6) + mean
    mixed = jnp.where(mask[..., None] > 0, pred, target)
    return unpatchify(mixed, patch, self.config.encoder.channels)


__all__ = ["MAE", "MAEConfig", "masked_mse", "patchify", "shuffle", "unpatchify"]
