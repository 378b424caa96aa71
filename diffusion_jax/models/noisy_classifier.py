"""A noise-aware classifier p(y | x_t, t): the down half of the diffusion U-Net (`UNetConfig.encoder_only`) with its
time embedding, then group norm, SiLU, global average pooling and a linear head — ADM's classifier
(`EncoderUNetModel` with 'adaptive' pooling), whose gradient guides an unconditional sampler
(`diffusion.gradient_guidance`)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers
from diffusion_jax.models.unet import UNet2DConditionModel, UNetConfig


class NoisyClassifier(nnx.Module):
  def __init__(self, cfg: UNetConfig, num_classes: int, *, rngs: nnx.Rngs):
    cfg = dataclasses.replace(cfg, encoder_only=True, cross_attention_dim=None)
    self.trunk = UNet2DConditionModel(cfg, rngs=rngs)
    width = cfg.block_out_channels[-1]
    self.norm = layers.group_norm(width, cfg.norm_num_groups, epsilon=cfg.norm_eps, rngs=rngs, dtype=cfg.dtype)
    self.head = layers.dense(width, num_classes, ("embed", "vocab"), rngs=rngs, dtype=cfg.dtype)

  def __call__(self, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """Logits [B, num_classes] of the noisy images x_t [B, H, W, C] at time steps t [B]."""
    h = jax.nn.silu(self.norm(self.trunk(x_t, t)))
    return self.head(jnp.mean(h, axis=(1, 2))).astype(jnp.float32)
