"""The diffusion U-Net, shaped like diffusers' `UNet2DConditionModel` so one family serves every use.

Pixel-space DDPM on MNIST and Stable Diffusion's latent U-Net are the same network at different sizes:
residual blocks with group norm and a time-embedding projection, down/up paths with skip connections,
and spatial transformer blocks (self-attention, optional cross-attention on text states, GEGLU
feed-forward) at the configured levels. Submodule names follow diffusers (`down_blocks.1.attentions.0`,
`mid_block.resnets.1`, `time_embedding.linear_1`, ...) so a Stable Diffusion 1.x/2.x checkpoint maps by
name; `diffusion_jax.pretrained.unet` holds the few renames that remain. Inputs and outputs are NHWC.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers, remat
from diffusion_jax.models.attention import Attention

PerLevel = Union[int, Sequence[int]]


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Sizes and options of the U-Net; the defaults are Stable Diffusion 1.x's (see `VARIANTS`).

  Per-level settings (`num_attention_heads`, `layers_per_block`, `transformer_layers_per_block`) take one value
  for all levels or one per level, counted from the highest resolution; the up path reuses the value of the level
  it mirrors, as diffusers does.
  """
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  layers_per_block: PerLevel = 2  # resnets per down level; the up level has one more
  attention_levels: Sequence[bool] = (True, True, True, False)  # a transformer block after each resnet
  up_attention_levels: Optional[Sequence[bool]] = None  # per level of the up path; None: as attention_levels
  use_mid_block: bool = True  # False: no middle block at all (diffusers' mid_block_type=None)
  mid_block_attention: bool = True  # resnet → transformer → resnet; False: resnet → resnet
  num_attention_heads: PerLevel = 8  # heads (not head width): head width is channels // heads
  cross_attention_dim: Optional[int] = 768  # None: self-attention only
  transformer_layers_per_block: PerLevel = 1
  use_linear_projection: bool = False  # transformer in/out projections: linear (SD2) or 1x1 conv (SD1)
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  time_embedding_dim: Optional[int] = None  # None: 4 × block_out_channels[0]
  num_class_embeds: int = 0  # >0: class-label conditioning, index num_class_embeds is the null class
  pooled_dim: int = 0  # >0: a pooled text embedding is projected and added to the time embedding
  resnet_time_scale_shift: str = "default"  # 'default': add the embedding; 'scale_shift': FiLM after norm2 (ADM)
  dtype: Any = None  # compute dtype (params stay float32)
  attention_impl: Optional[str] = None  # None (XLA picks), 'xla' or 'cudnn'
  remat: str = "none"  # per resnet and transformer block: 'none', 'full' or 'dots_saveable' (see models/remat.py)

  @property
  def levels(self) -> int:
    return len(self.block_out_channels)

  @property
  def temb_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  def _at(self, name: str, level: int):
    value = getattr(self, name)
    return value[level] if isinstance(value, (tuple, list)) else value

  def heads_at(self, level: int) -> int:
    return self._at("num_attention_heads", level)

  def layers_at(self, level: int) -> int:
    return self._at("layers_per_block", level)

  def transformer_layers_at(self, level: int) -> int:
    return self._at("transformer_layers_per_block", level)

  def up_attention_at(self, level: int) -> bool:
    ups = self.attention_levels if self.up_attention_levels is None else self.up_attention_levels
    return bool(ups[level])

  def validate(self) -> None:
    """Raises a one-line ValueError naming the first field whose length does not match the levels."""
    remat.check(self.remat)
    for name in ("attention_levels", "up_attention_levels", "num_attention_heads", "layers_per_block",
                 "transformer_layers_per_block"):
      value = getattr(self, name)
      if isinstance(value, (tuple, list)) and len(value) != self.levels:
        raise ValueError(f"{name} has {len(value)} entries for {self.levels} levels")


# Stable Diffusion's U-Nets by name: 1.x (CLIP ViT-L text, 8 heads everywhere) and 2.x (OpenCLIP ViT-H text,
# 64-wide heads, linear projections). The 2.x inpainting/depth models change only in_channels.
VARIANTS = {
    "sd15": UNetConfig(),
    "sd2": UNetConfig(num_attention_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True),
}


def variant(name: str, **overrides) -> UNetConfig:
  if name not in VARIANTS:
    raise ValueError(f"unknown U-Net variant {name!r}; known: {', '.join(sorted(VARIANTS))}")
  return dataclasses.replace(VARIANTS[name], **overrides)


class ResnetBlock2D(nnx.Module):
  """Two 3x3 convs with group norm and SiLU, the time embedding injected between them, and a residual path."""

  def __init__(self, in_ch: int, out_ch: int, temb_dim: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
    g, eps, dt = cfg.norm_num_groups, cfg.norm_eps, cfg.dtype
    self.norm1 = layers.group_norm(in_ch, g, epsilon=eps, rngs=rngs, dtype=dt)
    self.conv1 = layers.conv(in_ch, out_ch, 3, rngs=rngs, dtype=dt)
    if cfg.resnet_time_scale_shift not in ("default", "scale_shift"):
      raise ValueError(f"resnet_time_scale_shift must be 'default' or 'scale_shift', got {cfg.resnet_time_scale_shift!r}")
    self.scale_shift = cfg.resnet_time_scale_shift == "scale_shift"
    self.time_emb_proj = layers.dense(temb_dim, out_ch * (2 if self.scale_shift else 1), ("embed", "conv_out"),
                                      rngs=rngs, dtype=dt)
    self.norm2 = layers.group_norm(out_ch, g, epsilon=eps, rngs=rngs, dtype=dt)
    self.conv2 = layers.conv(out_ch, out_ch, 3, rngs=rngs, dtype=dt)
    self.conv_shortcut = layers.conv(in_ch, out_ch, 1, rngs=rngs, dtype=dt) if in_ch != out_ch else None

  def __call__(self, x, temb):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    emb = self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
    if self.scale_shift:  # the time/condition embedding modulates every feature map multiplicatively
      scale, shift = jnp.split(emb, 2, axis=-1)
      h = self.norm2(h) * (1.0 + scale) + shift
    else:
      h = self.norm2(h + emb)
    h = self.conv2(jax.nn.silu(h))
    skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
    return skip + h


class BasicTransformerBlock(nnx.Module):
  def __init__(self, dim: int, heads: int, context_dim: Optional[int], cfg: UNetConfig, *, rngs: nnx.Rngs):
    dt, impl = cfg.dtype, cfg.attention_impl
    self.norm1 = layers.layer_norm(dim, rngs=rngs, dtype=dt)
    self.attn1 = Attention(dim, heads=heads, rngs=rngs, dtype=dt, implementation=impl)
    if context_dim is not None:
      self.norm2 = layers.layer_norm(dim, rngs=rngs, dtype=dt)
      self.attn2 = Attention(dim, heads=heads, context_dim=context_dim, rngs=rngs, dtype=dt, implementation=impl)
    else:
      self.norm2 = self.attn2 = None
    self.norm3 = layers.layer_norm(dim, rngs=rngs, dtype=dt)
    self.ff = layers.FeedForward(dim, rngs=rngs, dtype=dt)

  def __call__(self, x, context):
    x = x + self.attn1(self.norm1(x))
    if self.attn2 is not None:
      x = x + self.attn2(self.norm2(x), context)
    return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
  """Group norm → projection → transformer blocks over the H·W tokens → projection, plus the residual.

  The tokens are `heads × (channels // heads)` wide, which is `channels` whenever the heads divide it (always,
  in Stable Diffusion).
  """

  def __init__(self, channels: int, heads: int, cfg: UNetConfig, *, rngs: nnx.Rngs, num_layers: int = 1):
    dt = cfg.dtype
    inner = heads * (channels // heads)
    self.use_linear = cfg.use_linear_projection
    self.norm = layers.group_norm(channels, cfg.norm_num_groups, epsilon=1e-6, rngs=rngs, dtype=dt)
    if self.use_linear:
      self.proj_in = layers.dense(channels, inner, ("conv_in", "embed"), rngs=rngs, dtype=dt)
      self.proj_out = layers.dense(inner, channels, ("embed", "conv_out"), rngs=rngs, dtype=dt)
    else:
      self.proj_in = layers.conv(channels, inner, 1, rngs=rngs, dtype=dt)
      self.proj_out = layers.conv(inner, channels, 1, rngs=rngs, dtype=dt)
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(inner, heads, cfg.cross_attention_dim, cfg, rngs=rngs) for _ in range(num_layers)])

  def __call__(self, x, context):
    b, h, w, c = x.shape
    y = self.norm(x)
    if self.use_linear:
      y = self.proj_in(y.reshape(b, h * w, c))
    else:
      y = self.proj_in(y)
      y = y.reshape(b, h * w, y.shape[-1])
    for block in self.transformer_blocks:
      y = block(y, context)
    if self.use_linear:
      y = self.proj_out(y).reshape(b, h, w, c)
    else:
      y = self.proj_out(y.reshape(b, h, w, y.shape[-1]))
    return x + y


class Downsample2D(nnx.Module):
  def __init__(self, ch: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
    self.conv = layers.conv(ch, ch, 3, strides=2, rngs=rngs, dtype=cfg.dtype)

  def __call__(self, x):
    return self.conv(x)


class Upsample2D(nnx.Module):
  def __init__(self, ch: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
    self.conv = layers.conv(ch, ch, 3, rngs=rngs, dtype=cfg.dtype)

  def __call__(self, x, output_size: Optional[Sequence[int]] = None):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour ×2
    if output_size is not None:
      # An odd-sized skip (2n-1 pixels) came from a stride-2 conv with padding 1; nearest-neighbour resizing
      # n → 2n-1 picks the same source pixels as ×2 followed by dropping the last row/column.
      x = x[:, :output_size[0], :output_size[1]]
    return self.conv(x)


class TimestepEmbedding(nnx.Module):
  """Sinusoidal features of the time step → linear → SiLU → linear."""

  def __init__(self, in_dim: int, temb_dim: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
    self.linear_1 = layers.dense(in_dim, temb_dim, ("conv_out", "embed"), rngs=rngs, dtype=cfg.dtype)
    self.linear_2 = layers.dense(temb_dim, temb_dim, ("embed", "embed"), rngs=rngs, dtype=cfg.dtype)

  def __call__(self, t):
    return self.linear_2(jax.nn.silu(self.linear_1(t)))


class UNetBlock(nnx.Module):
  """One level of the down or up path: resnets, each optionally followed by a transformer block."""

  def __init__(self, in_channels: Sequence[int], out_ch: int, temb_dim: int, with_attention: bool, heads: int,
               cfg: UNetConfig, *, resample: Optional[str], rngs: nnx.Rngs, transformer_layers: int = 1):
    self.resnets = nnx.List([ResnetBlock2D(c, out_ch, temb_dim, cfg, rngs=rngs) for c in in_channels])
    self.attentions = nnx.List([
        Transformer2DModel(out_ch, heads, cfg, rngs=rngs, num_layers=transformer_layers) for _ in in_channels
    ]) if with_attention else None
    self.downsamplers = nnx.List([Downsample2D(out_ch, cfg, rngs=rngs)]) if resample == "down" else None
    self.upsamplers = nnx.List([Upsample2D(out_ch, cfg, rngs=rngs)]) if resample == "up" else None


class UNetMidBlock(nnx.Module):
  """resnet → transformer → resnet at the lowest resolution (diffusers' `UNetMidBlock2DCrossAttn`)."""

  def __init__(self, ch: int, temb_dim: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
    top = cfg.levels - 1
    self.remat = cfg.remat
    self.resnets = nnx.List([ResnetBlock2D(ch, ch, temb_dim, cfg, rngs=rngs) for _ in range(2)])
    self.attentions = nnx.List([
        Transformer2DModel(ch, cfg.heads_at(top), cfg, rngs=rngs, num_layers=cfg.transformer_layers_at(top))
    ]) if cfg.mid_block_attention else None

  def __call__(self, h, temb, ctx):
    h = remat.apply(self.resnets[0], self.remat, h, temb)
    if self.attentions is not None:
      h = remat.apply(self.attentions[0], self.remat, h, ctx)
    return remat.apply(self.resnets[1], self.remat, h, temb)


class UNet2DConditionModel(nnx.Module):
  """`unet(sample_nhwc, timesteps, encoder_hidden_states, ...)` → the model output (ε, v or x0), NHWC."""

  def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.config = cfg
    chans = tuple(cfg.block_out_channels)
    levels = len(chans)
    dt = cfg.dtype
    temb_dim = cfg.temb_dim
    self.conv_in = layers.conv(cfg.in_channels, chans[0], 3, rngs=rngs, dtype=dt)
    self.time_embedding = TimestepEmbedding(chans[0], temb_dim, cfg, rngs=rngs)
    self.class_embedding = (layers.embed(cfg.num_class_embeds + 1, temb_dim, rngs=rngs, dtype=dt)
                            if cfg.num_class_embeds else None)
    self.add_embedding = (layers.dense(cfg.pooled_dim, temb_dim, ("embed", "embed"), rngs=rngs, dtype=dt)
                          if cfg.pooled_dim else None)

    down, prev = [], chans[0]
    skip_chans = [chans[0]]  # channels of every skip tensor, in the order the down path stores them
    for i, ch in enumerate(chans):
      n = cfg.layers_at(i)
      down.append(UNetBlock([prev] + [ch] * (n - 1), ch, temb_dim, cfg.attention_levels[i], cfg.heads_at(i), cfg,
                            resample="down" if i < levels - 1 else None, rngs=rngs,
                            transformer_layers=cfg.transformer_layers_at(i)))
      skip_chans += [ch] * (n + (i < levels - 1))
      prev = ch
    self.down_blocks = nnx.List(down)

    self.mid_block = UNetMidBlock(chans[-1], temb_dim, cfg, rngs=rngs) if cfg.use_mid_block else None

    up, prev = [], chans[-1]
    for level in reversed(range(levels)):
      ch, ins = chans[level], []
      for _ in range(cfg.layers_at(level) + 1):
        ins.append(prev + skip_chans.pop())
        prev = ch
      up.append(UNetBlock(ins, ch, temb_dim, cfg.up_attention_at(level), cfg.heads_at(level), cfg,
                          resample="up" if level > 0 else None, rngs=rngs,
                          transformer_layers=cfg.transformer_layers_at(level)))
    self.up_blocks = nnx.List(up)

    self.conv_norm_out = layers.group_norm(chans[0], cfg.norm_num_groups, epsilon=cfg.norm_eps, rngs=rngs, dtype=dt)
    self.conv_out = layers.conv(chans[0], cfg.out_channels, 3, rngs=rngs, dtype=dt)

  def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: Optional[jax.Array] = None,
               *, class_labels: Optional[jax.Array] = None, pooled: Optional[jax.Array] = None) -> jax.Array:
    cfg = self.config
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
    t = layers.timestep_embedding(timesteps, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                  downscale_freq_shift=cfg.freq_shift)
    temb = self.time_embedding(t.astype(sample.dtype))
    if self.class_embedding is not None:
      if class_labels is None:
        class_labels = jnp.full((sample.shape[0],), cfg.num_class_embeds, jnp.int32)  # the null class
      temb = temb + self.class_embedding(class_labels)
    if self.add_embedding is not None and pooled is not None:
      temb = temb + self.add_embedding(pooled)
    ctx = encoder_hidden_states

    h = self.conv_in(sample)
    skips = [h]
    for block in self.down_blocks:
      for k, resnet in enumerate(block.resnets):
        h = remat.apply(resnet, cfg.remat, h, temb)
        if block.attentions is not None:
          h = remat.apply(block.attentions[k], cfg.remat, h, ctx)
        skips.append(h)
      if block.downsamplers is not None:
        h = block.downsamplers[0](h)
        skips.append(h)

    if self.mid_block is not None:
      h = self.mid_block(h, temb, ctx)

    for block in self.up_blocks:
      for k, resnet in enumerate(block.resnets):
        h = remat.apply(resnet, cfg.remat, jnp.concatenate([h, skips.pop()], axis=-1), temb)
        if block.attentions is not None:
          h = remat.apply(block.attentions[k], cfg.remat, h, ctx)
      if block.upsamplers is not None:
        # Sizes not divisible by 2^(levels-1) shrink to odd sizes on the way down; upsample to the skip's size.
        h = block.upsamplers[0](h, output_size=skips[-1].shape[1:3])

    h = self.conv_out(jax.nn.silu(self.conv_norm_out(h)))
    return h
