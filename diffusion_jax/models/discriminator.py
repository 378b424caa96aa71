"""PatchGAN discriminator (pix2pix; taming-transformers' `NLayerDiscriminator`): one logit per image patch."""
from __future__ import annotations

import jax
from flax import nnx

from diffusion_jax.models import layers


class PatchDiscriminator(nnx.Module):
  """4×4 convolutions, LeakyReLU(0.2), a logit per patch.

  GroupNorm where pix2pix has BatchNorm: a per-example norm keeps the real and the fake batch, which the
  discriminator sees separately, from normalising each other.
  """

  def __init__(self, in_channels: int, channels: int = 64, num_layers: int = 3, norm_groups: int = 32, *,
               rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)  # pix2pix/taming's conv init
    pad = ((1, 1), (1, 1))
    self.conv_in = layers.conv(in_channels, channels, 4, strides=2, padding=pad, rngs=rngs, kernel_init=init)
    convs, norms, prev = [], [], channels
    for n in range(1, num_layers + 1):
      width = channels * min(2 ** n, 8)
      stride = 2 if n < num_layers else 1  # the last hidden conv keeps the resolution, as in pix2pix
      convs.append(layers.conv(prev, width, 4, strides=stride, padding=pad, rngs=rngs, kernel_init=init))
      norms.append(layers.group_norm(width, norm_groups, rngs=rngs))
      prev = width
    self.convs, self.norms = nnx.List(convs), nnx.List(norms)
    self.conv_out = layers.conv(prev, 1, 4, padding=pad, rngs=rngs, kernel_init=init)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.leaky_relu(self.conv_in(x), 0.2)
    for conv, norm in zip(self.convs, self.norms):
      x = jax.nn.leaky_relu(norm(conv(x)), 0.2)
    return self.conv_out(x)
