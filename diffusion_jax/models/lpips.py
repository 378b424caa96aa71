"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"), VGG variant.

The perceptual distance of the `lpips` package's `LPIPS(net='vgg')` (version 0.1), the term Stable Diffusion's
autoencoders were trained with: VGG-16 features at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 of both images,
each unit-normalised over channels, squared differences weighted per channel by a learned 1×1 projection,
averaged over space and summed over the five layers. Images are NHWC in [-1, 1]; grey images are repeated to RGB.

No package here ships the VGG weights, so the network always comes from a file the user gives
(`pretrained.lpips.load_lpips`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers

# VGG-16's convolutions up to relu5_3, grouped by the pooling that precedes each group (none for the first).
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# The `lpips` ScalingLayer: its inputs are in [-1, 1], VGG's ImageNet normalisation re-expressed for that range.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10  # lpips.normalize_tensor's


class LPIPS(nnx.Module):
  """`lpips(x, y)` -> the distance of each image pair, float32 [B]."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.blocks = nnx.List([])
    channels = 3
    for block in VGG16_BLOCKS:
      convs = []
      for width in block:
        convs.append(layers.conv(channels, width, 3, rngs=rngs))
        channels = width
      self.blocks.append(nnx.List(convs))
    self.lins = nnx.List([layers.conv(block[-1], 1, 1, use_bias=False, rngs=rngs) for block in VGG16_BLOCKS])

  def features(self, x: jax.Array) -> list[jax.Array]:
    x = (x.astype(jnp.float32) - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
    taps = []
    for i, block in enumerate(self.blocks):
      if i:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
      for conv in block:
        x = jax.nn.relu(conv(x))
      taps.append(x)
    return taps

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    if x.shape != y.shape:
      raise ValueError(f"LPIPS compares images of one shape, got {x.shape} and {y.shape}")
    if x.shape[-1] == 1:
      x, y = jnp.repeat(x, 3, axis=-1), jnp.repeat(y, 3, axis=-1)
    # Both images through VGG as one batch: one pass of each convolution.
    feats = self.features(jnp.concatenate([x, y]))
    total = jnp.zeros((x.shape[0],), jnp.float32)
    for f, lin in zip(feats, self.lins):
      f = f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + _EPS)
      a, b = jnp.split(f, 2)
      total = total + jnp.mean(lin(jnp.square(a - b)), axis=(1, 2, 3))
    return total
