"""The Vision Transformer image tower of CLIP-style models (CLIP, open_clip, SigLIP) and its MAP pooling head.

One implementation serves pretrained CLIP checkpoints and from-scratch contrastive training: its blocks are the
shared `transformer.TransformerBlock`, whose parameter names `pretrained/clip.py` maps to transformers' CLIP; the
size of a new model is picked by name from a small table, as big_vision's `decode_variant` does (`vit_config("B/16")`).
The text tower in `clip.py` is built from the same blocks (`tower_block`). Images are NHWC and CLIP-normalised.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.models import layers, remat
from diffusion_jax.models.attention import Attention
from diffusion_jax.models.transformer import MLP, BlockConfig, TransformerBlock

Dtype = Any


VISION_POOLINGS = ("cls", "map", "mean")


def tower_block(kind: str, cfg: Any, init: str = "clip") -> BlockConfig:
  """The block of a CLIP tower (a `CLIPVisionConfig` or `clip.CLIPTextConfig`); a ValueError naming the tower
  (`kind`) when its fields do not make one."""
  try:
    return BlockConfig(width=cfg.width, heads=cfg.heads, mlp_dim=cfg.mlp_dim, act=cfg.act, eps=cfg.layer_norm_eps,
                       init=init, depth=cfg.layers, dtype=cfg.dtype, attention_impl=cfg.attention_impl)
  except ValueError as e:
    raise ValueError(f"{kind} {e}") from None


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """A ViT image tower. Defaults are OpenAI's ViT-B/32; `vit_config` gives the other sizes by name.

  pooling: 'cls' reads a class token (CLIP), 'map' attends with a learned probe (big_vision/SigLIP MAP head),
  'mean' averages the patch tokens (then there is no class token). pre_norm: CLIP's layer norm after the
  embeddings (`ln_pre`); big_vision and SigLIP have none. patch_bias: a bias in the patch-embedding convolution,
  which big_vision's and SigLIP's ViTs have and CLIP's has not.
  """
  image_size: int = 224
  patch_size: int = 32
  channels: int = 3
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  act: str = "quick_gelu"
  pooling: str = "cls"
  pre_norm: bool = True
  patch_bias: bool = False
  layer_norm_eps: float = 1e-5
  dtype: Dtype = None  # compute dtype; parameters stay float32
  attention_impl: Optional[str] = None  # None (attention.attend picks), 'host', 'xla' or 'cudnn'
  remat: str = "none"  # per encoder layer: 'none', 'full' or 'dots_saveable' (see models/remat.py)
  fixed_positions: bool = False  # MAE's 2-D sin-cos position embeddings, never trained (`FixedPositions`)
  drop_path: float = 0.0  # stochastic depth of the last layer's branches in training, linear from 0 at the first

  def __post_init__(self):
    tower_block("vision", self)
    remat.check(self.remat)
    if not 0.0 <= self.drop_path < 1.0:
      raise ValueError(f"vision drop_path must be in [0, 1), got {self.drop_path}")
    if self.pooling not in VISION_POOLINGS:
      raise ValueError(f"vision pooling {self.pooling!r} is not one of {VISION_POOLINGS}")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_positions(self) -> int:
    return self.grid ** 2 + (self.pooling == "cls")


def _normal(std: float, axes) -> Callable:
  return nnx.with_partitioning(nnx.initializers.normal(std), tuple(axes))


class FixedPositions(nnx.Variable):
  """Position embeddings that never train (MAE's sin-cos table): not an `nnx.Param`, so the trainer carries and
  checkpoints them as state and no optimizer moves them; a run that fine-tunes the tower reads them into its
  learned `position_embedding` by name."""


def sincos_positions(width: int, grid: int, prefix: int = 1) -> np.ndarray:
  """MAE's fixed 2-D sin-cos position table [prefix + grid², width]: zeros for the class token, then per patch
  (row-major) the sines and cosines of its column, then of its row, at frequencies 10000^(-k/(width/4)). The column
  block comes first as in MAE's released weights (transformers keeps that order for them)."""
  if width % 4:
    raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {width}")
  omega = 1.0 / 10000.0 ** (np.arange(width // 4, dtype=np.float64) / (width // 4))
  rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
  angle_r, angle_c = np.outer(rows.reshape(-1), omega), np.outer(cols.reshape(-1), omega)
  table = np.concatenate([np.sin(angle_c), np.cos(angle_c), np.sin(angle_r), np.cos(angle_r)], axis=1)
  return np.concatenate([np.zeros((prefix, width)), table]).astype(np.float32)


class MAPHead(nnx.Module):
  """Multihead attention pooling (big_vision's MAPHead, SigLIP's head): a learned probe attends to all tokens."""

  def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
    w, dt = cfg.width, cfg.dtype
    self.probe = nnx.Param(_normal(w ** -0.5, (None, None, "embed"))(rngs.params(), (1, 1, w)))
    init = nnx.initializers.normal(w ** -0.5)
    self.attention = Attention(w, heads=cfg.heads, qkv_bias=True, kernel_init=init, rngs=rngs, dtype=dt,
                               implementation=cfg.attention_impl)
    self.layer_norm = layers.layer_norm(w, epsilon=cfg.layer_norm_eps, rngs=rngs, dtype=dt)
    self.mlp = MLP(w, cfg.mlp_dim, cfg.act, in_init=nnx.initializers.normal((2 * w) ** -0.5), out_init=init,
                   rngs=rngs, dtype=dt)

  def __call__(self, x: jax.Array) -> jax.Array:
    probe = jnp.broadcast_to(self.probe[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = self.attention(probe, x)
    return (x + self.mlp(self.layer_norm(x)))[:, 0]


def interpolate_posemb(posemb: jax.Array, grid: int, new_grid: tuple[int, int], num_prefix: int) -> jax.Array:
  """Resizes the patch-grid part of learned position embeddings [P + grid², W] to new_grid (bicubic).

  The first `num_prefix` rows (the class token's position) are kept as they are. `jax.image.resize` uses the
  Keys cubic kernel (a = -0.5) where PyTorch's bicubic uses a = -0.75, so interpolated embeddings differ slightly
  from transformers' `interpolate_pos_encoding=True`; both are approximations of a grid the model never saw.
  """
  if new_grid == (grid, grid):
    return posemb
  prefix, patches = posemb[:num_prefix], posemb[num_prefix:]
  patches = patches.reshape(grid, grid, -1)
  patches = jax.image.resize(patches, (*new_grid, patches.shape[-1]), method="bicubic")
  return jnp.concatenate([prefix, patches.reshape(-1, patches.shape[-1])], axis=0)


class CLIPVisionModel(nnx.Module):
  """`model(pixels NHWC, *, skip_last_layers=0) -> (hidden_states [B, N, W], pooled [B, W])`.

  hidden_states are the raw output of the last block (transformers' `last_hidden_state`, no final norm), or with
  `skip_last_layers=k` of the block k before it (k=1: the penultimate layer LLaVA-style feature extractors read);
  pooled always comes from the full tower, as the text tower's does, and is post-layer-normed: the normed class
  token ('cls', transformers' `pooler_output`), the mean of the normed tokens ('mean') or the MAP head over the
  normed tokens ('map'), as big_vision and SigLIP do.
  Images of another size than `image_size` get bicubically interpolated patch position embeddings.
  """

  def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    w, dt, eps = cfg.width, cfg.dtype, cfg.layer_norm_eps
    self.patch_embedding = nnx.Conv(
        cfg.channels, w, (cfg.patch_size, cfg.patch_size), strides=cfg.patch_size, padding="VALID",
        use_bias=cfg.patch_bias, dtype=dt, kernel_init=_normal(0.02, (None, None, None, "embed")),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)), rngs=rngs)
    if cfg.pooling == "cls":
      self.class_embedding = nnx.Param(_normal(w ** -0.5, ("embed",))(rngs.params(), (w,)))
    if cfg.fixed_positions:
      self.position_embedding = FixedPositions(
          jnp.asarray(sincos_positions(w, cfg.grid, int(cfg.pooling == "cls"))), out_sharding=(None, "embed"))
    else:
      self.position_embedding = nnx.Param(_normal(w ** -0.5, (None, "embed"))(rngs.params(), (cfg.num_positions, w)))
    if cfg.pre_norm:
      self.pre_layernorm = layers.layer_norm(w, epsilon=eps, rngs=rngs, dtype=dt)
    block = tower_block("vision", cfg)
    self.layers = nnx.List([TransformerBlock(block, rngs=rngs) for _ in range(cfg.layers)])
    self.post_layernorm = layers.layer_norm(w, epsilon=eps, rngs=rngs, dtype=dt)
    if cfg.pooling == "map":
      self.head = MAPHead(cfg, rngs=rngs)

  def embed(self, pixels: jax.Array) -> jax.Array:
    """Patch tokens (with the class token first for 'cls' pooling) plus position embeddings: [B, N, W]."""
    cfg = self.config
    if pixels.ndim != 4 or pixels.shape[-1] != cfg.channels:
      raise ValueError(f"expected NHWC images with {cfg.channels} channels, got shape {pixels.shape}")
    h, w = pixels.shape[1] // cfg.patch_size, pixels.shape[2] // cfg.patch_size
    x = self.patch_embedding(pixels)
    x = x.reshape(x.shape[0], h * w, x.shape[-1])
    if cfg.pooling == "cls":
      cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
    pos = interpolate_posemb(jnp.asarray(self.position_embedding[...]), cfg.grid, (h, w), int(cfg.pooling == "cls"))
    return x + pos.astype(x.dtype)[None]

  def __call__(self, pixels: jax.Array, *, skip_last_layers: int = 0,
               rng: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """`rng` (training only) draws the stochastic depth of `config.drop_path`."""
    states, x = self.run_layers(self.embed(pixels), skip_last_layers=skip_last_layers, rng=rng)
    return states, self._pool(x)

  def run_layers(self, tokens: jax.Array, *, skip_last_layers: int = 0,
                 rng: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """(states after the layer `skip_last_layers` before the last, states after the last) of embedded tokens
    (`embed`'s, or any subset of them: MAE encodes only the visible patches)."""
    cfg = self.config
    if not 0 <= skip_last_layers < cfg.layers:
      raise ValueError(f"skip_last_layers must be in [0, {cfg.layers}), got {skip_last_layers}")
    x = self.pre_layernorm(tokens) if cfg.pre_norm else tokens
    states = x
    for i, layer in enumerate(self.layers):
      rate = cfg.drop_path * i / max(cfg.layers - 1, 1)
      if rng is not None and rate:
        x = remat.apply(layer, cfg.remat, x, None, None, None, jax.random.fold_in(rng, i), drop_path=rate)
      else:
        x = remat.apply(layer, cfg.remat, x)
      if i == cfg.layers - 1 - skip_last_layers:
        states = x
    return states, x

  def _pool(self, x: jax.Array) -> jax.Array:
    if self.config.pooling == "cls":
      return self.post_layernorm(x[:, 0])
    if self.config.pooling == "mean":
      return jnp.mean(self.post_layernorm(x), axis=1)
    return self.head(self.post_layernorm(x))


HEAD_POOLINGS = ("cls", "mean")


class ViTClassifier(nnx.Module):
  """`clf(pixels NHWC, *, rng=None) -> logits [B, num_labels]` (float32): a ViT tower and a linear head, as
  transformers' `ViTForImageClassification` (the defaults) and the classifiers of ViT, MAE and big_vision.

  pooling: 'cls' reads the tower's pooled output (the final-normed class token for a 'cls' tower); 'mean' averages
  the patch tokens (not the class token) and then applies the tower's final norm (MAE's fine-tuning `fc_norm`).
  pre_logits: a width > 0 puts the original ViT's tanh layer before the head. probe: a BatchNorm without scale or
  offset before the head, MAE's linear probe on frozen features. `rng` (training) draws the tower's stochastic depth.
  """

  def __init__(self, cfg: CLIPVisionConfig, num_labels: int, *, pooling: str = "cls", pre_logits: int = 0,
               probe: bool = False, rngs: nnx.Rngs):
    if pooling not in HEAD_POOLINGS:
      raise ValueError(f"classifier pooling {pooling!r} is not one of {HEAD_POOLINGS}")
    if pooling == "mean" and cfg.pooling != "cls":
      raise ValueError("classifier pooling 'mean' averages the patch tokens of a tower with a class token "
                       f"(vision pooling 'cls'); this tower pools by {cfg.pooling!r}, use pooling 'cls'")
    self.pooling = pooling
    self.vision_model = CLIPVisionModel(cfg, rngs=rngs)
    width = pre_logits or cfg.width
    self.pre_logits = (layers.dense(cfg.width, pre_logits, ("embed", None), rngs=rngs, dtype=cfg.dtype)
                       if pre_logits else None)
    self.probe_norm = layers.batch_norm(width, rngs=rngs, epsilon=1e-6, affine=False) if probe else None
    self.classifier = layers.dense(width, num_labels, ("embed", None), rngs=rngs, dtype=cfg.dtype)

  def features(self, pixels: jax.Array, *, rng: Optional[jax.Array] = None) -> jax.Array:
    """The pooled features the head reads [B, width] (before pre-logits and the probe's norm)."""
    tower = self.vision_model
    if self.pooling == "cls":
      return tower(pixels, rng=rng)[1]
    _, x = tower.run_layers(tower.embed(pixels), rng=rng)
    return tower.post_layernorm(jnp.mean(x[:, 1:], axis=1))

  def __call__(self, pixels: jax.Array, *, rng: Optional[jax.Array] = None) -> jax.Array:
    h = self.features(pixels, rng=rng)
    if self.pre_logits is not None:
      h = jnp.tanh(self.pre_logits(h))
    if self.probe_norm is not None:
      h = self.probe_norm(h.astype(jnp.float32))
    return self.classifier(h).astype(jnp.float32)


# big_vision's ViT sizes: width, depth, heads, MLP width. 'mu' and 'test' are for tests and smoke runs.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "test": (32, 2, 2, 64),
    "mu": (64, 4, 4, 256),
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "M": (512, 12, 8, 2048),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "So400m": (1152, 27, 16, 4304),
    "H": (1280, 32, 16, 5120),
    "g": (1408, 40, 16, 6144),
    "G": (1664, 48, 16, 8192),
}


def vit_config(variant: str, **overrides) -> CLIPVisionConfig:
  """`vit_config("B/16", image_size=224)`: the named size with patch size after the slash; keywords override."""
  name, _, patch = variant.partition("/")
  if name not in VARIANTS or not patch.isdigit():
    raise ValueError(f"unknown ViT variant {variant!r}: expected NAME/PATCH with NAME one of {', '.join(VARIANTS)}")
  width, depth, heads, mlp = VARIANTS[name]
  fields = dict(width=width, layers=depth, heads=heads, mlp_dim=mlp, patch_size=int(patch))
  fields.update(overrides)
  return CLIPVisionConfig(**fields)


__all__ = ["CLIPVisionConfig", "CLIPVisionModel", "FixedPositions", "HEAD_POOLINGS", "MAPHead", "ViTClassifier", "sincos_positions", "VARIANTS", "interpolate_posemb", "tower_block",
           "vit_config"]
