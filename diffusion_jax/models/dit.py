"""DiT, the diffusion transformer of Peebles & Xie (2023), shaped like diffusers' `DiTTransformer2DModel`.

An image (pixels or VAE latents, NHWC) is cut into p×p patches, embedded, given fixed 2D sin-cos positions and
run through transformer blocks whose layer norms are modulated by the timestep (and class) embedding — adaLN-Zero:
each residual branch is scaled by a learned gate that starts at zero, so every block starts as the identity and the
zero-initialised final layer makes a fresh model predict exactly zero. A final adaLN layer and a linear map each
token back to a p×p×C patch.

Text conditioning (not in the paper's class-conditional models, and not in diffusers' class) is optional:
`conditioning='cross_attention'` adds a cross-attention layer after self-attention in every block (PixArt-α),
`'joint_attention'` projects the text tokens to the model width and prepends them to the image tokens, so that
self-attention runs over both (the paper's "in-context" conditioning, with a sequence instead of two tokens).

Submodule names follow diffusers where they exist, so `pretrained/dit.py` maps a checkpoint nearly by name.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.models import layers, remat
from diffusion_jax.models.attention import Attention

_xavier = nnx.initializers.xavier_uniform()
_zeros = nnx.initializers.zeros_init()

# Timestep frequencies fed to the timestep MLP (DiT's `frequency_embedding_size`).
TIME_FREQ_DIM = 256
# The attention-branch and final layer norms use DiT's eps whatever `norm_eps` says (diffusers does the same).
ADALN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Hyper-parameters of a DiT; `dit_config(name)` gives the paper's variants."""
  input_size: int = 32  # training height = width; sets the position-embedding scale for other sizes
  patch_size: int = 2
  in_channels: int = 4
  out_channels: Optional[int] = None  # None: 2 * in_channels with learn_sigma, else in_channels
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000  # 0: unconditional; else the label table has a last row, the null class, for CFG
  learn_sigma: bool = True  # the second half of the output channels predicts the variance interpolation (IDDPM)
  context_dim: int = 0  # >0: every call takes text-encoder states of this width
  conditioning: str = "cross_attention"  # with context_dim: 'cross_attention' or 'joint_attention'
  norm_eps: float = 1e-6  # MLP-branch (and cross-attention) layer norm; diffusers' DiT folders say 1e-5
  freq_shift: float = 1.0  # timestep frequencies: diffusers' DiT uses 1, the original DiT code 0
  # diffusers gives every block its own timestep/label embedder (identical copies in converted DiT checkpoints);
  # True keeps them separate so folders whose copies differ load exactly. False shares one, as in the paper.
  per_block_embedding: bool = False
  dtype: Any = None  # compute dtype; parameters stay float32
  attention_impl: Optional[str] = None  # None (attention.attend picks), 'host', 'xla' or 'cudnn'
  remat: str = "none"  # per transformer block: 'none', 'full' or 'dots_saveable' (see models/remat.py)

  def __post_init__(self):
    remat.check(self.remat)
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if self.hidden_size % 4:
      raise ValueError(f"hidden_size {self.hidden_size} must be divisible by 4 for the 2D sin-cos positions")
    if self.conditioning not in ("cross_attention", "joint_attention"):
      raise ValueError(f"conditioning must be 'cross_attention' or 'joint_attention', got {self.conditioning!r}")

  @property
  def output_channels(self) -> int:
    if self.out_channels is not None:
      return self.out_channels
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  @property
  def mlp_dim(self) -> int:
    return int(self.hidden_size * self.mlp_ratio)


# name → (hidden_size, depth, num_heads); the patch size is the number after the slash.
_WIDTHS = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
    "tiny": (32, 2, 2),  # for tests
    "small": (64, 3, 4),  # for tests and toy runs
}
VARIANTS = tuple(f"{w}/{p}" for w in _WIDTHS for p in (2, 4, 8))


def dit_config(name: str, **overrides) -> DiTConfig:
  """The variant `name` ('S/2' … 'XL/8', 'tiny/2', 'small/4', …) with field overrides, e.g. `in_channels=1`."""
  width, _, patch = name.partition("/")
  if width not in _WIDTHS or patch not in ("2", "4", "8"):
    raise ValueError(f"unknown DiT variant {name!r}; known: {', '.join(VARIANTS)}")
  hidden, depth, heads = _WIDTHS[width]
  return DiTConfig(**{"hidden_size": hidden, "depth": depth, "num_heads": heads, "patch_size": int(patch),
                      **overrides})


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, base_size: int) -> np.ndarray:
  """[grid_h·grid_w, dim] fixed positions, row-major like the patch sequence (diffusers' get_2d_sincos_pos_embed).

  Positions are scaled by base_size/grid so a grid larger than the training one interpolates the positions the
  model has seen instead of extrapolating. The first half of the channels encodes the column, the second the row.
  """
  def axis_positions(n):  # float32 arithmetic as diffusers does, before the float64 frequencies
    return np.arange(n, dtype=np.float32) / np.float32(n / base_size)

  def sincos(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  rows, cols = np.meshgrid(axis_positions(grid_h), axis_positions(grid_w), indexing="ij")
  emb = np.concatenate([sincos(dim // 2, cols), sincos(dim // 2, rows)], axis=1)
  return emb.astype(np.float32)


def _layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """Layer norm without scale or bias (adaLN supplies them); statistics in float32 for low-precision inputs."""
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  var = jnp.square(xf - mean).mean(-1, keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nnx.Module):
  """Sinusoidal frequencies of t → MLP (diffusers' `TimestepEmbedding`, DiT's `t_embedder`)."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    self.freq_shift = cfg.freq_shift
    # DiT initialises the timestep MLP with N(0, 0.02), not xavier.
    init = nnx.initializers.normal(0.02)
    self.linear_1 = layers.dense(TIME_FREQ_DIM, cfg.hidden_size, (None, "mlp"), rngs=rngs, dtype=cfg.dtype,
                                 kernel_init=init)
    self.linear_2 = layers.dense(cfg.hidden_size, cfg.hidden_size, ("mlp", "embed"), rngs=rngs, dtype=cfg.dtype,
                                 kernel_init=init)

  def __call__(self, t: jax.Array, dtype) -> jax.Array:
    freqs = layers.timestep_embedding(t, TIME_FREQ_DIM, flip_sin_to_cos=True, downscale_freq_shift=self.freq_shift)
    return self.linear_2(jax.nn.silu(self.linear_1(freqs.astype(dtype))))


class ConditionEmbedder(nnx.Module):
  """The adaLN conditioning vector c = embed(t) + embed(class label)."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    self.num_classes = cfg.num_classes
    self.timestep_embedder = TimestepEmbedder(cfg, rngs=rngs)
    # One extra row: the null class that classifier-free guidance (and label dropout in training) maps to.
    self.class_embedder = (layers.embed(cfg.num_classes + 1, cfg.hidden_size, rngs=rngs, dtype=cfg.dtype)
                           if cfg.num_classes else None)

  def __call__(self, t: jax.Array, labels: Optional[jax.Array], dtype) -> jax.Array:
    c = self.timestep_embedder(t, dtype)
    if self.class_embedder is not None:
      if labels is None:
        labels = jnp.full(t.shape, self.num_classes, jnp.int32)
      c = c + self.class_embedder(labels)
    return c


class DiTBlock(nnx.Module):
  """adaLN-Zero transformer block: gated self-attention, optional cross-attention, gated GELU MLP."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    d, dt, impl = cfg.hidden_size, cfg.dtype, cfg.attention_impl
    self.norm_eps = cfg.norm_eps
    self.emb = ConditionEmbedder(cfg, rngs=rngs) if cfg.per_block_embedding else None
    # adaLN-Zero: shift/scale/gate for both branches, zero so the block starts as the identity.
    self.adaln = layers.dense(d, 6 * d, ("embed", "mlp"), rngs=rngs, dtype=dt, kernel_init=_zeros)
    self.attn1 = Attention(d, heads=cfg.num_heads, qkv_bias=True, rngs=rngs, dtype=dt, implementation=impl)
    if cfg.context_dim and cfg.conditioning == "cross_attention":
      # The cross-attention branch has no adaLN gate; a zero output projection keeps the block an identity at init
      # (PixArt-α does the same).
      self.attn2 = Attention(d, heads=cfg.num_heads, context_dim=cfg.context_dim, qkv_bias=True,
                             out_kernel_init=_zeros, rngs=rngs, dtype=dt, implementation=impl)
    else:
      self.attn2 = None
    self.ff_in = layers.dense(d, cfg.mlp_dim, ("embed", "mlp"), rngs=rngs, dtype=dt, kernel_init=_xavier)
    self.ff_out = layers.dense(cfg.mlp_dim, d, ("mlp", "embed"), rngs=rngs, dtype=dt, kernel_init=_xavier)

  def __call__(self, x: jax.Array, c: jax.Array, context: Optional[jax.Array]) -> jax.Array:
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(
        self.adaln(jax.nn.silu(c)), 6, axis=-1)
    x = x + gate_msa[:, None] * self.attn1(_modulate(_layer_norm(x, ADALN_EPS), shift_msa, scale_msa))
    if self.attn2 is not None:
      x = x + self.attn2(_layer_norm(x, self.norm_eps), context)
    h = _modulate(_layer_norm(x, self.norm_eps), shift_mlp, scale_mlp)
    h = self.ff_out(jax.nn.gelu(self.ff_in(h), approximate=True))
    return x + gate_mlp[:, None] * h


class DiT(nnx.Module):
  """`dit(x_nhwc, timesteps, class_labels=None, context=None)` → NHWC prediction with `output_channels` channels.

  With `learn_sigma` the first half of the channels is the noise (or whatever the objective predicts) and the
  second half the variance interpolation, as in DiT/IDDPM. `class_labels=None` means the null class; label
  dropout for classifier-free guidance is the caller's (replace labels by `num_classes`), so the model stays a pure
  function of its inputs. An unconditional model (`num_classes=0`) ignores `class_labels`.
  """

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    d, p, dt = cfg.hidden_size, cfg.patch_size, cfg.dtype
    # A stride-p convolution is a dense layer on each flattened patch; DiT initialises it as one (xavier).
    self.patch_embed = nnx.Conv(
        cfg.in_channels, d, (p, p), strides=p, padding="VALID", dtype=dt,
        kernel_init=nnx.with_partitioning(_xavier, (None, None, None, "embed")),
        bias_init=nnx.with_partitioning(_zeros, ("embed",)), rngs=rngs)
    if cfg.context_dim and cfg.conditioning == "joint_attention":
      self.context_embedder = layers.dense(cfg.context_dim, d, (None, "embed"), rngs=rngs, dtype=dt,
                                           kernel_init=_xavier)
    else:
      self.context_embedder = None
    self.emb = None if cfg.per_block_embedding else ConditionEmbedder(cfg, rngs=rngs)
    self.transformer_blocks = nnx.List([DiTBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
    # Final adaLN layer and the patch projection, both zero: a fresh model predicts exactly zero.
    self.proj_out_1 = layers.dense(d, 2 * d, ("embed", "mlp"), rngs=rngs, dtype=dt, kernel_init=_zeros)
    self.proj_out_2 = layers.dense(d, p * p * cfg.output_channels, ("embed", None), rngs=rngs, dtype=dt,
                                   kernel_init=_zeros)

  def __call__(self, x: jax.Array, timesteps: jax.Array, class_labels: Optional[jax.Array] = None,
               context: Optional[jax.Array] = None) -> jax.Array:
    cfg = self.config
    b, height, width, _ = x.shape
    p = cfg.patch_size
    if height % p or width % p:
      raise ValueError(f"input {height}x{width} is not divisible by the patch size {p}")
    if cfg.context_dim and context is None:
      raise ValueError(f"this DiT is text-conditioned (context_dim={cfg.context_dim}); pass context")
    if not cfg.context_dim and context is not None:
      raise ValueError("this DiT takes no context (context_dim=0)")
    gh, gw = height // p, width // p

    h = self.patch_embed(x).reshape(b, gh * gw, cfg.hidden_size)
    pos = sincos_pos_embed_2d(cfg.hidden_size, gh, gw, base_size=cfg.input_size // p)  # a constant under jit
    h = h + jnp.asarray(pos, h.dtype)[None]

    t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
    if self.emb is None:
      conds = [blk.emb(t, class_labels, h.dtype) for blk in self.transformer_blocks]
    else:
      conds = [self.emb(t, class_labels, h.dtype)] * cfg.depth

    n_text = 0
    if self.context_embedder is not None:
      text = self.context_embedder(context.astype(h.dtype))
      n_text = text.shape[1]
      h = jnp.concatenate([text, h], axis=1)
      context = None
    for block, c in zip(self.transformer_blocks, conds):
      h = remat.apply(block, cfg.remat, h, c, context)
    h = h[:, n_text:]

    # diffusers conditions the final layer on the first block's embedding (all copies agree in real checkpoints).
    shift, scale = jnp.split(self.proj_out_1(jax.nn.silu(conds[0])), 2, axis=-1)
    h = self.proj_out_2(_modulate(_layer_norm(h, ADALN_EPS), shift, scale))
    c_out = cfg.output_channels
    h = h.reshape(b, gh, gw, p, p, c_out).transpose(0, 1, 3, 2, 4, 5)
    return h.reshape(b, height, width, c_out)
