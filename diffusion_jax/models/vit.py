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
  attention_impl: Optional[str] = None  # None (XLA picks), 'xla' or 'cudnn'
  remat: str = "none"  # per encoder layer: 'none', 'full' or 'dots_saveable' (see models/remat.py)

  def __post_init__(self):
    tower_block("vision", self)
    remat.check(self.remat)
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
    pos = interpolate_posemb(self.position_embedding[...], cfg.grid, (h, w), int(cfg.pooling == "cls"))
    return x + pos.astype(x.dtype)[None]

  def __call__(self, pixels: jax.Array, *, skip_last_layers: int = 0) -> tuple[jax.Array, jax.Array]:
    if not 0 <= skip_last_layers < self.config.layers:
      raise ValueError(f"skip_last_layers must be in [0, {self.config.layers}), got {skip_last_layers}")
    x = self.embed(pixels)
    if self.config.pre_norm:
      x = self.pre_layernorm(x)
    states = x
    for i, layer in enumerate(self.layers):
      x = remat.apply(layer, self.config.remat, x)
      if i == self.config.layers - 1 - skip_last_layers:
        states = x
    return states, self._pool(x)

  def _pool(self, x: jax.Array) -> jax.Array:
    if self.config.pooling == "cls":
      return self.post_layernorm(x[:, 0])
    if self.config.pooling == "mean":
      return jnp.mean(self.post_layernorm(x), axis=1)
    return self.head(self.post_layernorm(x))


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


__all__ = ["CLIPVisionConfig", "CLIPVisionModel", "MAPHead", "VARIANTS", "interpolate_posemb", "tower_block",
           "vit_config"]
