"""The diffusion U-Net, shaped like diffusers' `UNet2DConditionModel` so one family serves every use.

Pixel-space DDPM on MNIST and Stable Diffusion's latent U-Net are the same network at different sizes:
residual blocks with group norm and a time-embedding projection, down/up paths with skip connections,
and spatial transformer blocks (self-attention, optional cross-attention on text states, GEGLU
feed-forward) at the configured levels. Submodule names follow diffusers so a checkpoint maps by name.
Inputs and outputs are NHWC.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  attention_levels: Sequence[bool] = (True, True, True, False)  # a transformer block after each resnet
  mid_block_attention: bool = True
  num_attention_heads: Union[int, Sequence[int]] = 8  # per level, or one for all
  cross_attention_dim: Optional[int] = 768  # None: self-attention only
  transformer_layers_per_block: int = 1
  use_linear_projection: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  num_class_embeds: int = 0  # >0: class-label conditioning, index num_class_embeds is the null class
  pooled_dim: int = 0  # >0: a pooled text embedding is projected and added to the time embedding
  resnet_time_scale_shift: str = "default"  # 'default': add the embedding; 'scale_shift': FiLM after norm2 (ADM)
  dtype: Any = None  # compute dtype (params stay float32)
  attention_impl: Optional[str] = None  # None (XLA picks), 'xla' or 'cudnn'

  def heads_at(self, level: int) -> int:
    h = self.num_attention_heads
    return h[level] if isinstance(h, (tuple, list)) else h


class ResnetBlock2D(nnx.Module):
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
    self.attn1 = layers.Attention(dim, heads=heads, rngs=rngs, dtype=dt, implementation=impl)
    if context_dim is not None:
      self.norm2 = layers.layer_norm(dim, rngs=rngs, dtype=dt)
      self.attn2 = layers.Attention(dim, heads=heads, context_dim=context_dim, rngs=rngs, dtype=dt,
                                    implementation=impl)
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
  """Group norm → projection → transformer blocks over the H·W tokens → projection, plus the residual."""

  def __init__(self, channels: int, heads: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
    dt = cfg.dtype
    self.use_linear = cfg.use_linear_projection
    self.norm = layers.group_norm(channels, cfg.norm_num_groups, epsilon=1e-6, rngs=rngs, dtype=dt)
    if self.use_linear:
      self.proj_in = layers.dense(channels, channels, ("conv_in", "embed"), rngs=rngs, dtype=dt)
      self.proj_out = layers.dense(channels, channels, ("embed", "conv_out"), rngs=rngs, dtype=dt)
    else:
      self.proj_in = layers.conv(channels, channels, 1, rngs=rngs, dtype=dt)
      self.proj_out = layers.conv(channels, channels, 1, rngs=rngs, dtype=dt)
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(channels, heads, cfg.cross_attention_dim, cfg, rngs=rngs)
        for _ in range(cfg.transformer_layers_per_block)])

  def __call__(self, x, context):
    b, h, w, c = x.shape
    y = self.norm(x)
    if self.use_linear:
      y = self.proj_in(y.reshape(b, h * w, c))
    else:
      y = self.proj_in(y).reshape(b, h * w, c)
    for block in self.transformer_blocks:
      y = block(y, context)
    if self.use_linear:
      y = self.proj_out(y).reshape(b, h, w, c)
    else:
      y = self.proj_out(y.reshape(b, h, w, c))
    return x + y


class Downsample2D(nnx.Module):
  def __init__(self, ch: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
    self.conv = layers.conv(ch, ch, 3, strides=2, rngs=rngs, dtype=cfg.dtype)

  def __call__(self, x):
    return self.conv(x)


class Upsample2D(nnx.Module):
  def __init__(self, ch: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
    self.conv = layers.conv(ch, ch, 3, rngs=rngs, dtype=cfg.dtype)

  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour ×2
    return self.conv(x)


class UNetBlock(nnx.Module):
  """One level of the down or up path: resnets, each optionally followed by a transformer block."""

  def __init__(self, in_channels: Sequence[int], out_ch: int, temb_dim: int, with_attention: bool, heads: int,
               cfg: UNetConfig, *, resample: Optional[str], rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock2D(c, out_ch, temb_dim, cfg, rngs=rngs) for c in in_channels])
    self.attentions = nnx.List([Transformer2DModel(out_ch, heads, cfg, rngs=rngs) for _ in in_channels]
                               ) if with_attention else None
    self.downsamplers = nnx.List([Downsample2D(out_ch, cfg, rngs=rngs)]) if resample == "down" else None
    self.upsamplers = nnx.List([Upsample2D(out_ch, cfg, rngs=rngs)]) if resample == "up" else None


class UNet2DConditionModel(nnx.Module):
  """`unet(sample_nhwc, timesteps, encoder_hidden_states, ...)` → the model output (ε, v or x0), NHWC."""

  def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    chans = tuple(cfg.block_out_channels)
    levels = len(chans)
    if len(cfg.attention_levels) != levels:
      raise ValueError(f"attention_levels has {len(cfg.attention_levels)} entries for {levels} levels")
    dt = cfg.dtype
    temb_dim = chans[0] * 4
    self.conv_in = layers.conv(cfg.in_channels, chans[0], 3, rngs=rngs, dtype=dt)
    self.time_embedding_linear_1 = layers.dense(chans[0], temb_dim, ("conv_out", "embed"), rngs=rngs, dtype=dt)
    self.time_embedding_linear_2 = layers.dense(temb_dim, temb_dim, ("embed", "embed"), rngs=rngs, dtype=dt)
    self.class_embedding = (layers.embed(cfg.num_class_embeds + 1, temb_dim, rngs=rngs, dtype=dt)
                            if cfg.num_class_embeds else None)
    self.add_embedding = (layers.dense(cfg.pooled_dim, temb_dim, ("embed", "embed"), rngs=rngs, dtype=dt)
                          if cfg.pooled_dim else None)

    down, prev = [], chans[0]
    for i, ch in enumerate(chans):
      ins = [prev] + [ch] * (cfg.layers_per_block - 1)
      down.append(UNetBlock(ins, ch, temb_dim, cfg.attention_levels[i], cfg.heads_at(i), cfg,
                            resample="down" if i < levels - 1 else None, rngs=rngs))
      prev = ch
    self.down_blocks = nnx.List(down)

    self.mid_resnet_1 = ResnetBlock2D(chans[-1], chans[-1], temb_dim, cfg, rngs=rngs)
    self.mid_attention = (Transformer2DModel(chans[-1], cfg.heads_at(levels - 1), cfg, rngs=rngs)
                          if cfg.mid_block_attention else None)
    self.mid_resnet_2 = ResnetBlock2D(chans[-1], chans[-1], temb_dim, cfg, rngs=rngs)

    # Skip channels in the order the up path pops them (diffusers' bookkeeping).
    skip_chans = [chans[0]]
    for i, ch in enumerate(chans):
      skip_chans += [ch] * cfg.layers_per_block
      if i < levels - 1:
        skip_chans.append(ch)
    up, prev = [], chans[-1]
    for j, ch in enumerate(reversed(chans)):
      level = levels - 1 - j
      ins = []
      for _ in range(cfg.layers_per_block + 1):
        ins.append(prev + skip_chans.pop())
        prev = ch
      up.append(UNetBlock(ins, ch, temb_dim, cfg.attention_levels[level], cfg.heads_at(level), cfg,
                          resample="up" if level > 0 else None, rngs=rngs))
    self.up_blocks = nnx.List(up)

    self.conv_norm_out = layers.group_norm(chans[0], cfg.norm_num_groups, epsilon=cfg.norm_eps, rngs=rngs, dtype=dt)
    self.conv_out = layers.conv(chans[0], cfg.out_channels, 3, rngs=rngs, dtype=dt)

  def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: Optional[jax.Array] = None,
               *, class_labels: Optional[jax.Array] = None, pooled: Optional[jax.Array] = None) -> jax.Array:
    cfg = self.config
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
    t = layers.timestep_embedding(timesteps, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                  downscale_freq_shift=cfg.freq_shift)
    temb = self.time_embedding_linear_2(jax.nn.silu(self.time_embedding_linear_1(t.astype(sample.dtype))))
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
        h = resnet(h, temb)
        if block.attentions is not None:
          h = block.attentions[k](h, ctx)
        skips.append(h)
      if block.downsamplers is not None:
        h = block.downsamplers[0](h)
        skips.append(h)

    h = self.mid_resnet_1(h, temb)
    if self.mid_attention is not None:
      h = self.mid_attention(h, ctx)
    h = self.mid_resnet_2(h, temb)

    for block in self.up_blocks:
      for k, resnet in enumerate(block.resnets):
        h = resnet(jnp.concatenate([h, skips.pop()], axis=-1), temb)
        if block.attentions is not None:
          h = block.attentions[k](h, ctx)
      if block.upsamplers is not None:
        h = block.upsamplers[0](h)

    h = self.conv_out(jax.nn.silu(self.conv_norm_out(h)))
    return h
