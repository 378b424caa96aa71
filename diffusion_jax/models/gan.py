"""GAN generators and discriminators, NHWC, images in [-1, 1].

Architectures (`GANConfig.architecture`):
  'dcgan'   Radford et al.: generator dense → reshape → 4×4 stride-2 transposed convolutions with BatchNorm and ReLU,
            tanh output; discriminator 4×4 stride-2 convolutions with LeakyReLU(0.2) and optional BatchNorm (none
            on the first layer), flattened features.
  'resnet'  SNGAN / Miyato & Koyama's ResNet GAN for 32 px: generator up-blocks (BN, ReLU, nearest ×2, 3×3 convs,
            1×1 shortcut); discriminator down-blocks (ReLU, 3×3 convs, 2×2 average pooling) — every block but the
            last two halves the resolution — then ReLU and global sum pooling.
Any discriminator layer can be spectrally normalised (`spectral_norm`, `models.spectral_norm`).

Conditioning (`cond`: 'class' labels, 'text' caption embeddings, 'none'): each player embeds the condition on its
own (`ConditionEmbedding`: a class table, or GAN-INT-CLS's dense + LeakyReLU compression of the caption embedding).
The generator modulates its BatchNorms by it (`g_conditioning='batch_norm'`, conditional BatchNorm: see
`GeneratorNorm` for why) or concatenates it to z (`'concat'`, the classic conditional DCGAN). The discriminator
either projects (`conditioning='projection'`, Miyato & Koyama 2018: logit = ψ(h) + ⟨embed(y), h⟩ with h its pooled
features) or concatenates (`'concat'`, GAN-INT-CLS: the embedding tiled over the last feature map, then a 1×1
convolution).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers
from diffusion_jax.models.spectral_norm import maybe as maybe_sn
from diffusion_jax.models.unet import avg_pool2, upsample_nearest

ARCHITECTURES = ("dcgan", "resnet")
CONDITIONS = ("class", "text", "none")
CONDITIONINGS = ("projection", "concat")  # the discriminator's
G_CONDITIONINGS = ("batch_norm", "concat")
_DCGAN_INIT = nnx.initializers.normal(0.02)  # DCGAN's N(0, 0.02) weights
_RESNET_INIT = nnx.initializers.xavier_uniform()  # SNGAN's


@dataclasses.dataclass(frozen=True)
class GANConfig:
  architecture: str = "dcgan"
  image_size: int = 28
  channels: int = 1
  z_dim: int = 64
  # Generator widths: g_channels[0] at the base resolution image_size / 2**len(g_channels), then one ×2
  # upsampling per entry (DCGAN: into the next width, the last into the image; ResNet: each block into the next
  # width, the last keeping its own, then a 3×3 convolution into the image).
  g_channels: tuple[int, ...] = (128, 64)
  # Discriminator widths, one strided convolution (DCGAN) or residual block (ResNet) each.
  d_channels: tuple[int, ...] = (64, 128)
  # DCGAN: a dense layer of this width (LeakyReLU) on the flattened features makes h, as in InfoGAN's MNIST
  # discriminator; 0: h is the flattened map itself (a projection ⟨embed(y), h⟩ is then a pixel-aligned template).
  d_hidden: int = 0
  cond: str = "class"
  num_classes: int = 10  # cond='class'
  text_dim: int = 0  # cond='text': the width of the caption embedding
  cond_dim: int = 64  # the width of each player's embedding of the condition (a class table, a text compression)
  conditioning: str = "projection"
  g_batch_norm: bool = True
  # How the generator takes the condition: 'batch_norm' (conditional BatchNorm, needs g_batch_norm) or 'concat'
  # (to z).
  g_conditioning: str = "batch_norm"
  d_batch_norm: bool = False
  spectral_norm: bool = False

  def __post_init__(self):
    for value, allowed, what in ((self.architecture, ARCHITECTURES, "architecture"),
                                 (self.cond, CONDITIONS, "cond"), (self.conditioning, CONDITIONINGS, "conditioning")):
      if value not in allowed:
        raise ValueError(f"GAN {what} must be one of {allowed}, got {value!r}")
    if not self.g_channels or not self.d_channels:
      raise ValueError("the generator and the discriminator each need at least one width")
    if self.image_size % self.scale:
      raise ValueError(f"image_size={self.image_size} is not a multiple of the generator's {self.scale}× "
                       f"upsampling ({len(self.g_channels)} widths)")
    if self.architecture == "dcgan" and self.image_size % 2 ** len(self.d_channels):
      raise ValueError(f"image_size={self.image_size} does not halve {len(self.d_channels)} times")
    if self.architecture == "resnet" and self.d_batch_norm:
      raise ValueError("the ResNet discriminator has no BatchNorm (SNGAN); use spectral_norm")
    if self.g_conditioning not in G_CONDITIONINGS:
      raise ValueError(f"GAN g_conditioning must be one of {G_CONDITIONINGS}, got {self.g_conditioning!r}")
    if self.g_conditioning == "batch_norm" and self.cond != "none" and not self.g_batch_norm:
      raise ValueError("g_conditioning='batch_norm' modulates the generator's BatchNorms: set g_batch_norm or use "
                       "g_conditioning='concat'")
    if self.cond == "class" and self.num_classes < 1:
      raise ValueError("class conditioning needs num_classes >= 1")
    if self.cond == "text" and self.text_dim < 1:
      raise ValueError("text conditioning needs the caption embedding's width, text_dim >= 1")
    if self.cond != "none" and self.cond_dim < 1:
      raise ValueError(f"cond_dim must be >= 1, got {self.cond_dim}")

  @property
  def scale(self) -> int:
    return 2 ** len(self.g_channels)

  @property
  def base_size(self) -> int:
    return self.image_size // self.scale


class ConditionEmbedding(nnx.Module):
  """A player's own `width`-wide embedding of the condition: a class table (a bias-free dense layer on one-hot
  labels, so spectral normalisation applies to it as to any layer; rows drawn by `table_init`) or dense +
  LeakyReLU(0.2) of a caption embedding."""

  def __init__(self, cfg: GANConfig, width: int, *, rngs: nnx.Rngs, spectral_norm: bool = False,
               table_init=nnx.initializers.normal(1.0)):
    self.cond, self.num_classes = cfg.cond, cfg.num_classes
    if cfg.cond == "class":
      layer = layers.dense(cfg.num_classes, width, ("vocab", "embed"), rngs=rngs, use_bias=False,
                           kernel_init=table_init)
    else:
      layer = layers.dense(cfg.text_dim, width, ("embed", "mlp"), rngs=rngs)
    self.layer = maybe_sn(layer, spectral_norm, rngs=rngs)

  def __call__(self, cond: jax.Array) -> jax.Array:
    if self.cond == "class":
      return self.layer(jax.nn.one_hot(cond, self.num_classes, dtype=jnp.float32))
    return jax.nn.leaky_relu(self.layer(cond.astype(jnp.float32)), 0.2)


def _check_cond(cfg: GANConfig, cond) -> None:
  if (cond is None) != (cfg.cond == "none"):
    raise ValueError(f"a GAN with cond={cfg.cond!r} was called {'without' if cond is None else 'with'} a condition")


# ---------------------------------------------------------------------------------------------------- generators
class GeneratorNorm(nnx.Module):
  """The generator's normalisation: BatchNorm, conditional BatchNorm (its scale 1 + Wγ·c and shift Wβ·c from the
  player's condition embedding c, de Vries et al. 2017 — SNGAN-projection's and BigGAN's generators), or nothing.

  Why conditional: with the class concatenated to z (`g_conditioning='concat'`) the generator of
  configs/mnist_gan.py drew nearly one image per class — two of its samples of a digit 0.2× as far apart as two real
  digits, against 0.99× with conditional BatchNorm. A likely reason: z and the class embedding reach the first
  BatchNorm together, the class-to-class variance comes to dominate the statistics that normalise both, and z's
  share of every feature shrinks. Here BatchNorm normalises features of z alone and the class modulates them.
  """

  def __init__(self, cfg: GANConfig, features: int, *, rngs: nnx.Rngs):
    self.conditional = cfg.g_batch_norm and cfg.cond != "none" and cfg.g_conditioning == "batch_norm"
    self.norm = layers.batch_norm(features, rngs=rngs, affine=not self.conditional) if cfg.g_batch_norm else None
    # Modulations of a few tenths from the start, so samples follow the class early (with N(0, 0.02) the generator
    # stayed unconditional for longer: 16% digit accuracy after 400 steps of configs/mnist_gan.py, against 30%).
    init = nnx.initializers.normal(0.1)
    self.gain = (layers.dense(cfg.cond_dim, features, ("embed", "mlp"), rngs=rngs, kernel_init=init)
                 if self.conditional else None)
    self.shift = (layers.dense(cfg.cond_dim, features, ("embed", "mlp"), rngs=rngs, kernel_init=init)
                  if self.conditional else None)

  def __call__(self, x: jax.Array, c: Optional[jax.Array]) -> jax.Array:
    if self.norm is None:
      return x
    x = self.norm(x)
    if not self.conditional:
      return x
    expand = lambda v: v.reshape(v.shape[:1] + (1,) * (x.ndim - 2) + v.shape[-1:]).astype(x.dtype)
    return x * (1.0 + expand(self.gain(c))) + expand(self.shift(c))


class _Generator(nnx.Module):
  """What both generators share: the condition embedding (concatenated to z, or feeding the conditional norms) and
  the first dense layer to the base feature map."""

  def _init_input(self, cfg: GANConfig, rngs: nnx.Rngs, *, init, use_bias: bool):
    self.cfg = cfg
    self.embed = ConditionEmbedding(cfg, cfg.cond_dim, rngs=rngs) if cfg.cond != "none" else None
    self.concat = self.embed is not None and cfg.g_conditioning == "concat"
    in_dim = cfg.z_dim + (cfg.cond_dim if self.concat else 0)
    base = cfg.base_size
    self.fc = layers.dense(in_dim, base * base * cfg.g_channels[0], ("embed", "mlp"), rngs=rngs, use_bias=use_bias,
                           kernel_init=init)

  def _input(self, z: jax.Array, cond) -> tuple[jax.Array, Optional[jax.Array]]:
    """(the base feature map before its normalisation, the condition embedding)."""
    _check_cond(self.cfg, cond)
    c = self.embed(cond) if self.embed is not None else None
    if self.concat:
      z = jnp.concatenate([z, c], axis=-1)
    base = self.cfg.base_size
    return self.fc(z).reshape(z.shape[0], base, base, self.cfg.g_channels[0]), c


class DCGANGenerator(_Generator):

  def __init__(self, cfg: GANConfig, *, rngs: nnx.Rngs):
    bn = cfg.g_batch_norm
    self._init_input(cfg, rngs, init=_DCGAN_INIT, use_bias=not bn)  # no bias before a BatchNorm: it would cancel
    widths = tuple(cfg.g_channels) + (cfg.channels,)
    last = len(cfg.g_channels) - 1
    self.ups = nnx.List([layers.conv_transpose(a, b, 4, strides=2, rngs=rngs, use_bias=not bn or i == last,
                                               kernel_init=_DCGAN_INIT)
                         for i, (a, b) in enumerate(zip(widths, widths[1:]))])
    self.norms = nnx.List([GeneratorNorm(cfg, w, rngs=rngs) for w in widths[:-1]])

  def __call__(self, z: jax.Array, cond: Optional[jax.Array] = None) -> jax.Array:
    x, c = self._input(z, cond)
    for norm, up in zip(self.norms, self.ups):
      x = up(jax.nn.relu(norm(x, c)))
    return jnp.tanh(x)


class GeneratorBlock(nnx.Module):
  """BN → ReLU → nearest ×2 → 3×3 conv → BN → ReLU → 3×3 conv, plus a ×2, 1×1-convolved shortcut."""

  def __init__(self, cfg: GANConfig, a: int, b: int, *, rngs: nnx.Rngs):
    conv = lambda i, o, k: layers.conv(i, o, k, rngs=rngs, kernel_init=_RESNET_INIT)
    self.norm1, self.norm2 = GeneratorNorm(cfg, a, rngs=rngs), GeneratorNorm(cfg, b, rngs=rngs)
    self.conv1, self.conv2, self.skip = conv(a, b, 3), conv(b, b, 3), conv(a, b, 1)

  def __call__(self, x: jax.Array, c: Optional[jax.Array]) -> jax.Array:
    h = self.conv1(upsample_nearest(jax.nn.relu(self.norm1(x, c))))
    h = self.conv2(jax.nn.relu(self.norm2(h, c)))
    return h + self.skip(upsample_nearest(x))


class ResNetGenerator(_Generator):

  def __init__(self, cfg: GANConfig, *, rngs: nnx.Rngs):
    self._init_input(cfg, rngs, init=_RESNET_INIT, use_bias=True)
    widths = tuple(cfg.g_channels)
    outs = widths[1:] + widths[-1:]
    self.blocks = nnx.List([GeneratorBlock(cfg, a, b, rngs=rngs) for a, b in zip(widths, outs)])
    self.norm = GeneratorNorm(cfg, widths[-1], rngs=rngs)
    self.conv_out = layers.conv(widths[-1], cfg.channels, 3, rngs=rngs, kernel_init=_RESNET_INIT)

  def __call__(self, z: jax.Array, cond: Optional[jax.Array] = None) -> jax.Array:
    x, c = self._input(z, cond)
    for block in self.blocks:
      x = block(x, c)
    return jnp.tanh(self.conv_out(jax.nn.relu(self.norm(x, c))))


# ---------------------------------------------------------------------------------------------------- discriminators
class DiscriminatorHead(nnx.Module):
  """Features [B, h, w, C] and the condition → one logit per image: pooled features h, ψ(h), plus the projection
  ⟨embed(y), h⟩ or after a concatenation of the tiled embedding and a 1×1 convolution."""

  def __init__(self, cfg: GANConfig, size: int, width: int, *, rngs: nnx.Rngs, pooling: str):
    sn = cfg.spectral_norm
    init = _DCGAN_INIT if cfg.architecture == "dcgan" else _RESNET_INIT
    self.cfg, self.pooling = cfg, pooling
    conditioned = cfg.cond != "none"
    concat = conditioned and cfg.conditioning == "concat"
    self.concat_embed = ConditionEmbedding(cfg, cfg.cond_dim, rngs=rngs, spectral_norm=sn) if concat else None
    self.concat = (maybe_sn(layers.conv(width + cfg.cond_dim, width, 1, rngs=rngs, kernel_init=init), sn, rngs=rngs)
                   if concat else None)
    features = size * size * width if pooling == "flatten" else width
    hidden = pooling == "flatten" and cfg.d_hidden > 0
    self.hidden = (maybe_sn(layers.dense(features, cfg.d_hidden, ("embed", "mlp"), rngs=rngs, kernel_init=init), sn,
                            rngs=rngs) if hidden else None)
    features = cfg.d_hidden if hidden else features
    self.psi = maybe_sn(layers.dense(features, 1, ("mlp", "embed"), rngs=rngs, kernel_init=init), sn, rngs=rngs)
    # Miyato & Koyama's class embedding starts small (Glorot), so the projection grows from zero.
    self.project = (ConditionEmbedding(cfg, features, rngs=rngs, spectral_norm=sn,
                                       table_init=nnx.initializers.xavier_uniform())
                    if conditioned and cfg.conditioning == "projection" else None)

  def __call__(self, f: jax.Array, cond: Optional[jax.Array]) -> jax.Array:
    if self.concat is not None:
      c = self.concat_embed(cond)[:, None, None, :]
      f = jnp.concatenate([f, jnp.broadcast_to(c, (*f.shape[:3], c.shape[-1])).astype(f.dtype)], axis=-1)
      f = jax.nn.leaky_relu(self.concat(f), 0.2)
    if self.pooling == "flatten":
      h = f.reshape(f.shape[0], -1)
      h = jax.nn.leaky_relu(self.hidden(h), 0.2) if self.hidden is not None else h
    else:  # SNGAN: ReLU, then the sum over positions
      h = jnp.sum(jax.nn.relu(f), axis=(1, 2))
    logit = self.psi(h)[:, 0]
    if self.project is not None:
      logit = logit + jnp.sum(self.project(cond) * h, axis=-1)
    return logit


class DCGANDiscriminator(nnx.Module):

  def __init__(self, cfg: GANConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    sn, widths = cfg.spectral_norm, (cfg.channels,) + tuple(cfg.d_channels)
    # DCGAN: no BatchNorm on the first layer; the others' would cancel a bias.
    normed = lambda i: cfg.d_batch_norm and i > 0
    convs = [layers.conv(a, b, 4, strides=2, padding=((1, 1), (1, 1)), rngs=rngs, kernel_init=_DCGAN_INIT,
                         use_bias=not normed(i)) for i, (a, b) in enumerate(zip(widths, widths[1:]))]
    self.convs = nnx.List([maybe_sn(c, sn, rngs=rngs) for c in convs])
    self.norms = (nnx.List([layers.batch_norm(w, rngs=rngs) for w in cfg.d_channels[1:]])
                  if cfg.d_batch_norm else None)
    size = cfg.image_size // 2 ** len(cfg.d_channels)
    self.head = DiscriminatorHead(cfg, size, cfg.d_channels[-1], rngs=rngs, pooling="flatten")

  def features(self, x: jax.Array) -> jax.Array:
    """The last feature map, the head's input."""
    for i, conv in enumerate(self.convs):
      x = conv(x)
      if i > 0 and self.norms is not None:
        x = self.norms[i - 1](x)
      x = jax.nn.leaky_relu(x, 0.2)
    return x

  def __call__(self, x: jax.Array, cond: Optional[jax.Array] = None) -> jax.Array:
    _check_cond(self.cfg, cond)
    return self.head(self.features(x), cond)


class DiscriminatorBlock(nnx.Module):
  """(ReLU →) 3×3 conv → ReLU → 3×3 conv (→ 2×2 average pool), plus a 1×1-convolved (pooled) shortcut; the first
  block (`first`) takes the image itself, unactivated, and pools its shortcut before the convolution (SNGAN's
  OptimizedDisBlock)."""

  def __init__(self, a: int, b: int, *, rngs: nnx.Rngs, down: bool, first: bool, sn: bool):
    conv = lambda i, o, k: maybe_sn(layers.conv(i, o, k, rngs=rngs, kernel_init=_RESNET_INIT), sn, rngs=rngs)
    self.down, self.first = down, first
    self.conv1, self.conv2 = conv(a, b, 3), conv(b, b, 3)
    self.skip = conv(a, b, 1) if (a != b or down or first) else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(x if self.first else jax.nn.relu(x))
    h = self.conv2(jax.nn.relu(h))
    if self.down:
      h = avg_pool2(h)
    s = x
    if self.first and self.down:
      s = self.skip(avg_pool2(s))
    elif self.skip is not None:
      s = self.skip(s)
      s = avg_pool2(s) if self.down else s
    return h + s


class ResNetDiscriminator(nnx.Module):

  def __init__(self, cfg: GANConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    widths = (cfg.channels,) + tuple(cfg.d_channels)
    downs = max(1, len(cfg.d_channels) - 2)
    self.blocks = nnx.List([DiscriminatorBlock(a, b, rngs=rngs, down=i < downs, first=i == 0, sn=cfg.spectral_norm)
                            for i, (a, b) in enumerate(zip(widths, widths[1:]))])
    size = cfg.image_size // 2 ** downs
    self.head = DiscriminatorHead(cfg, size, cfg.d_channels[-1], rngs=rngs, pooling="sum")

  def features(self, x: jax.Array) -> jax.Array:
    """The last feature map, the head's input."""
    for block in self.blocks:
      x = block(x)
    return x

  def __call__(self, x: jax.Array, cond: Optional[jax.Array] = None) -> jax.Array:
    _check_cond(self.cfg, cond)
    return self.head(self.features(x), cond)


GENERATORS = {"dcgan": DCGANGenerator, "resnet": ResNetGenerator}
DISCRIMINATORS = {"dcgan": DCGANDiscriminator, "resnet": ResNetDiscriminator}


class GAN(nnx.Module):
  """Both players and, for caption conditioning, the frozen text encoder whose embedding both take (a task-built
  module such as `models.conditioners.FrozenTextConditioner`; each player embeds its output on its own)."""

  def __init__(self, cfg: GANConfig, *, rngs: nnx.Rngs, text: Optional[nnx.Module] = None):
    self.cfg = cfg
    self.generator = GENERATORS[cfg.architecture](cfg, rngs=rngs)
    self.discriminator = DISCRIMINATORS[cfg.architecture](cfg, rngs=rngs)
    self.text = text
