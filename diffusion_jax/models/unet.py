"""The diffusion U-Net, shaped like diffusers' `UNet2DConditionModel` so one family serves every use.

Pixel-space DDPM on MNIST and Stable Diffusion's latent U-Net are the same network at different sizes:
residual blocks with group norm and a time-embedding projection, down/up paths with skip connections,
and attention blocks at the configured levels. The attention block is one of three kinds (`attention_block`):
Stable Diffusion's spatial transformer (self-attention, cross-attention on text states, GEGLU feed-forward);
unCLIP/Karlo's added-key/value attention, where pixels attend over the text's and their own keys in one softmax;
or plain spatial self-attention (diffusers' `UNet2DModel`, no text). Resampling is a strided/upsampling conv
(`resample='conv'`) or, as in unCLIP and ADM, a resnet that average-pools or repeats pixels (`'resnet'`).
Submodule names follow diffusers (`down_blocks.1.attentions.0`, `mid_block.resnets.1`, `time_embedding.linear_1`,
...) so Stable Diffusion and Karlo checkpoints map by name; `diffusion_jax.pretrained.unet` holds the few renames
that remain. Inputs and outputs are NHWC.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers, remat
from diffusion_jax.models.attention import Attention, SpatialSelfAttention

PerLevel = Union[int, Sequence[int]]
ATTENTION_BLOCKS = ("transformer", "added_kv", "spatial")
RESAMPLES = ("conv", "resnet")


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
  attention_levels: Sequence[bool] = (True, True, True, False)  # an attention block after each resnet
  up_attention_levels: Optional[Sequence[bool]] = None  # per level of the up path; None: as attention_levels
  # Which attention block, everywhere: 'transformer' (SD's Transformer2DModel), 'added_kv' (unCLIP's
  # SimpleCrossAttn blocks: text keys/values added to the pixels' own) or 'spatial' (self-attention, no text).
  attention_block: str = "transformer"
  only_cross_attention: bool = False  # 'added_kv' only: pixels attend to the text alone, not to themselves
  resample: str = "conv"  # 'conv': strided conv / upsample+conv; 'resnet': a resnet that pools / repeats pixels
  use_mid_block: bool = True  # False: no middle block at all (diffusers' mid_block_type=None)
  mid_block_attention: bool = True  # resnet → attention → resnet; False: resnet → resnet
  mid_attention_group_norm: bool = True  # 'spatial' only: False drops the norm (UNet2DModel with scale_shift)
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
  # 'identity': `class_labels` is a float embedding [B, temb_dim] added to the time embedding (unCLIP's image
  # embedding projection); None: no such input.
  class_embed: Optional[str] = None
  pooled_dim: int = 0  # >0: a pooled text embedding is projected and added to the time embedding
  resnet_time_scale_shift: str = "default"  # 'default': add the embedding; 'scale_shift': FiLM after norm2 (ADM)
  dtype: Any = None  # compute dtype (params stay float32)
  attention_impl: Optional[str] = None  # None (attention.attend picks), 'host', 'xla' or 'cudnn'
  remat: str = "none"  # per resnet and attention block: 'none', 'full' or 'dots_saveable' (see models/remat.py)
  # True: the down path and middle block only, returning the lowest-resolution features (ADM's EncoderUNetModel,
  # the trunk of a noise-aware classifier, `models.noisy_classifier`); no up path, out_channels unused.
  encoder_only: bool = False

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
    """Raises a one-line ValueError naming the first field that is out of range or whose length does not match
    the levels."""
    remat.check(self.remat)
    for name, allowed in (("attention_block", ATTENTION_BLOCKS), ("resample", RESAMPLES),
                          ("class_embed", (None, "identity"))):
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}")
    problems = (
        ("attention_block='added_kv' needs a cross_attention_dim",
         self.attention_block == "added_kv" and self.cross_attention_dim is None),
        ("attention_block='spatial' takes no text: set cross_attention_dim=None",
         self.attention_block == "spatial" and self.cross_attention_dim is not None),
        ("only_cross_attention needs attention_block='added_kv'",
         self.only_cross_attention and self.attention_block != "added_kv"),
        ("mid_attention_group_norm=False needs attention_block='spatial'",
         not self.mid_attention_group_norm and self.attention_block != "spatial"),
        ("class_embed and num_class_embeds exclude each other", self.class_embed and self.num_class_embeds))
    for message, bad in problems:
      if bad:
        raise ValueError(message)
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


def upsample_nearest(x: jax.Array) -> jax.Array:
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool2(x: jax.Array) -> jax.Array:
  """2×2 average pooling with stride 2 (sizes are even: `UNet2DConditionModel` checks)."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class ResnetBlock2D(nnx.Module):
  """Two 3x3 convs with group norm and SiLU, the time embedding injected between them, and a residual path.

  `resample='down'`/`'up'` halves/doubles the resolution of both paths after the first norm (average pooling /
  nearest-neighbour repetition), which is how unCLIP's and ADM's U-Nets resample.
  """

  def __init__(self, in_ch: int, out_ch: int, temb_dim: int, cfg: UNetConfig, *, rngs: nnx.Rngs,
               resample: Optional[str] = None):
    self.resize = {None: None, "down": avg_pool2, "up": upsample_nearest}[resample]
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
    h = jax.nn.silu(self.norm1(x))
    if self.resize is not None:
      x, h = self.resize(x), self.resize(h)
    h = self.conv1(h)
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

  def __call__(self, x, context, mask=None):
    x = x + self.attn1(self.norm1(x))
    if self.attn2 is not None:
      x = x + self.attn2(self.norm2(x), context, mask=mask)
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

  def __call__(self, x, context, mask=None):
    b, h, w, c = x.shape
    y = self.norm(x)
    if self.use_linear:
      y = self.proj_in(y.reshape(b, h * w, c))
    else:
      y = self.proj_in(y)
      y = y.reshape(b, h * w, y.shape[-1])
    for block in self.transformer_blocks:
      y = block(y, context, mask)
    if self.use_linear:
      y = self.proj_out(y).reshape(b, h, w, c)
    else:
      y = self.proj_out(y.reshape(b, h, w, y.shape[-1]))
    return x + y


class AddedKVAttention(Attention):
  """unCLIP's attention (diffusers' SimpleCrossAttn blocks, `AttnAddedKVProcessor`): group-normed pixels attend
  over the text tokens' keys/values (`add_k_proj`/`add_v_proj`) followed by their own, so one softmax weighs the
  text against the image; with `only_cross_attention` the pixels attend to the text alone. A residual wraps it."""

  def __init__(self, channels: int, heads: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
    dt = cfg.dtype
    super().__init__(channels, heads=heads, qkv_bias=True, rngs=rngs, dtype=dt, implementation=cfg.attention_impl)
    if cfg.only_cross_attention:  # the pixels' own keys/values: diffusers has no to_k/to_v here
      self.key = self.value = None
    width = heads * self.head_dim
    self.add_k_proj = layers.dense(cfg.cross_attention_dim, width, ("embed", "heads"), rngs=rngs, dtype=dt)
    self.add_v_proj = layers.dense(cfg.cross_attention_dim, width, ("embed", "heads"), rngs=rngs, dtype=dt)
    # diffusers builds this norm with its Attention's default epsilon, not the model's norm_eps.
    self.group_norm = layers.group_norm(channels, cfg.norm_num_groups, epsilon=1e-5, rngs=rngs, dtype=dt)

  def __call__(self, x, context, mask=None):
    """x [B, H, W, C], context [B, L, cross_attention_dim], mask [B, 1, 1, L] (True: the token is seen)."""
    b, h, w, c = x.shape
    y = self.group_norm(x).reshape(b, h * w, c)
    split = lambda t: t.reshape(*t.shape[:2], self.heads, self.head_dim)
    k, v = split(self.add_k_proj(context)), split(self.add_v_proj(context))
    if self.key is not None:
      k = jnp.concatenate([k, split(self.key(y))], axis=1)
      v = jnp.concatenate([v, split(self.value(y))], axis=1)
      if mask is not None:  # a pixel always sees the pixels
        mask = jnp.concatenate([mask, jnp.ones((b, 1, 1, h * w), bool)], axis=-1)
    return x + self._attend(split(self.query(y)), k, v, mask).reshape(b, h, w, c)


def attention_block(channels: int, heads: int, cfg: UNetConfig, *, rngs: nnx.Rngs, transformer_layers: int = 1,
                    group_norm: bool = True) -> nnx.Module:
  """The configured kind of attention block (`cfg.attention_block`) at one place of the U-Net."""
  if cfg.attention_block == "added_kv":
    return AddedKVAttention(channels, heads, cfg, rngs=rngs)
  if cfg.attention_block == "spatial":
    return SpatialSelfAttention(channels, heads=heads, groups=cfg.norm_num_groups if group_norm else None,
                                epsilon=cfg.norm_eps, rngs=rngs, dtype=cfg.dtype, implementation=cfg.attention_impl)
  return Transformer2DModel(channels, heads, cfg, rngs=rngs, num_layers=transformer_layers)


def apply_attention(block: nnx.Module, cfg: UNetConfig, h, ctx, mask):
  if cfg.attention_block == "spatial":  # no text to attend to
    return remat.apply(block, cfg.remat, h)
  return remat.apply(block, cfg.remat, h, ctx, mask)


class Downsample2D(nnx.Module):
  def __init__(self, ch: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
    self.conv = layers.conv(ch, ch, 3, strides=2, rngs=rngs, dtype=cfg.dtype)

  def __call__(self, x):
    return self.conv(x)


class Upsample2D(nnx.Module):
  def __init__(self, ch: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
    self.conv = layers.conv(ch, ch, 3, rngs=rngs, dtype=cfg.dtype)

  def __call__(self, x, output_size: Optional[Sequence[int]] = None):
    x = upsample_nearest(x)
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
  """One level of the down or up path: resnets, each optionally followed by an attention block, then an optional
  down/upsampler (a conv, or with `cfg.resample='resnet'` a resampling resnet)."""

  def __init__(self, in_channels: Sequence[int], out_ch: int, temb_dim: int, with_attention: bool, heads: int,
               cfg: UNetConfig, *, resample: Optional[str], rngs: nnx.Rngs, transformer_layers: int = 1):
    self.resnets = nnx.List([ResnetBlock2D(c, out_ch, temb_dim, cfg, rngs=rngs) for c in in_channels])
    self.attentions = nnx.List([
        attention_block(out_ch, heads, cfg, rngs=rngs, transformer_layers=transformer_layers) for _ in in_channels
    ]) if with_attention else None
    if resample is None:
      sampler = None
    elif cfg.resample == "resnet":
      sampler = ResnetBlock2D(out_ch, out_ch, temb_dim, cfg, rngs=rngs, resample=resample)
    else:
      sampler = (Downsample2D if resample == "down" else Upsample2D)(out_ch, cfg, rngs=rngs)
    self.downsamplers = nnx.List([sampler]) if resample == "down" else None
    self.upsamplers = nnx.List([sampler]) if resample == "up" else None


class UNetMidBlock(nnx.Module):
  """resnet → attention → resnet at the lowest resolution (diffusers' `UNetMidBlock2DCrossAttn`,
  `UNetMidBlock2DSimpleCrossAttn` or `UNetMidBlock2D`, by `cfg.attention_block`)."""

  def __init__(self, ch: int, temb_dim: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
    top = cfg.levels - 1
    self.config = cfg
    self.resnets = nnx.List([ResnetBlock2D(ch, ch, temb_dim, cfg, rngs=rngs) for _ in range(2)])
    self.attentions = nnx.List([
        attention_block(ch, cfg.heads_at(top), cfg, rngs=rngs, transformer_layers=cfg.transformer_layers_at(top),
                        group_norm=cfg.mid_attention_group_norm)
    ]) if cfg.mid_block_attention else None

  def __call__(self, h, temb, ctx, mask=None):
    cfg = self.config
    h = remat.apply(self.resnets[0], cfg.remat, h, temb)
    if self.attentions is not None:
      h = apply_attention(self.attentions[0], cfg, h, ctx, mask)
    return remat.apply(self.resnets[1], cfg.remat, h, temb)


class UNet2DConditionModel(nnx.Module):
  """`unet(sample_nhwc, timesteps, encoder_hidden_states, ...)` → the model output (ε, v or x0), NHWC.

  Keywords: `class_labels` (int [B] with `num_class_embeds`; float [B, temb_dim] with `class_embed='identity'`),
  `pooled` (with `pooled_dim`), `encoder_attention_mask` (bool [B, L], True for text tokens to attend to; unCLIP's
  `attention_mask`).
  """

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
    if cfg.encoder_only:
      self.up_blocks = self.conv_norm_out = self.conv_out = None
      return

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
               *, class_labels: Optional[jax.Array] = None, pooled: Optional[jax.Array] = None,
               encoder_attention_mask: Optional[jax.Array] = None) -> jax.Array:
    cfg = self.config
    factor = 2 ** (cfg.levels - 1)
    if cfg.resample == "resnet" and not cfg.encoder_only and any(d % factor for d in sample.shape[1:3]):
      # Average pooling drops odd rows that the up path cannot restore (diffusers fails on these sizes too).
      raise ValueError(f"resample='resnet' needs image sizes divisible by {factor}, got {sample.shape[1:3]}")
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
    t = layers.timestep_embedding(timesteps, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                  downscale_freq_shift=cfg.freq_shift)
    temb = self.time_embedding(t.astype(sample.dtype))
    if self.class_embedding is not None:
      if class_labels is None:
        class_labels = jnp.full((sample.shape[0],), cfg.num_class_embeds, jnp.int32)  # the null class
      temb = temb + self.class_embedding(class_labels)
    if cfg.class_embed == "identity":
      if class_labels is None:
        raise ValueError("class_embed='identity' needs class_labels: a float embedding [B, temb_dim]")
      temb = temb + class_labels.astype(temb.dtype)
    if self.add_embedding is not None and pooled is not None:
      temb = temb + self.add_embedding(pooled)
    ctx = encoder_hidden_states
    mask = None if encoder_attention_mask is None else encoder_attention_mask.astype(bool)[:, None, None, :]

    h = self.conv_in(sample)
    skips = [h]
    for block in self.down_blocks:
      for k, resnet in enumerate(block.resnets):
        h = remat.apply(resnet, cfg.remat, h, temb)
        if block.attentions is not None:
          h = apply_attention(block.attentions[k], cfg, h, ctx, mask)
        skips.append(h)
      if block.downsamplers is not None:
        sampler = block.downsamplers[0]
        h = remat.apply(sampler, cfg.remat, h, temb) if cfg.resample == "resnet" else sampler(h)
        skips.append(h)

    if self.mid_block is not None:
      h = self.mid_block(h, temb, ctx, mask)
    if cfg.encoder_only:
      return h

    for block in self.up_blocks:
      for k, resnet in enumerate(block.resnets):
        h = remat.apply(resnet, cfg.remat, jnp.concatenate([h, skips.pop()], axis=-1), temb)
        if block.attentions is not None:
          h = apply_attention(block.attentions[k], cfg, h, ctx, mask)
      if block.upsamplers is not None:
        sampler = block.upsamplers[0]
        if cfg.resample == "resnet":
          h = remat.apply(sampler, cfg.remat, h, temb)
        else:
          # Sizes not divisible by 2^(levels-1) shrink to odd sizes on the way down; upsample to the skip's size.
          h = sampler(h, output_size=skips[-1].shape[1:3])

    h = self.conv_out(jax.nn.silu(self.conv_norm_out(h)))
    return h


class UNet2DModel(UNet2DConditionModel):
  """diffusers' `UNet2DModel`: the same network without text, e.g. unCLIP's super-resolution U-Nets.

  `unet(sample_nhwc, timesteps, class_labels=None)` → NHWC. The config has `cross_attention_dim=None` (and
  `attention_block='spatial'` where there is attention, as in diffusers).
  """

  def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
    if cfg.cross_attention_dim is not None:
      raise ValueError(f"UNet2DModel takes no text: cross_attention_dim must be None, got {cfg.cross_attention_dim}")
    super().__init__(cfg, rngs=rngs)

  def __call__(self, sample: jax.Array, timesteps: jax.Array, *,
               class_labels: Optional[jax.Array] = None) -> jax.Array:
    return super().__call__(sample, timesteps, class_labels=class_labels)
