"""A small causal text transformer that encodes captions for conditioning.

It is trained jointly with the denoiser when no pretrained text tower is given (the foundation's MNIST model);
the CLIP text tower plugs into the same place. Returns per-token states for cross-attention and a pooled
vector taken at the end-of-text position (the last non-pad token).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers, remat


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
  vocab_size: int = 259
  max_len: int = 32
  width: int = 128
  layers: int = 2
  heads: int = 4
  mlp_ratio: int = 4
  pad_id: int = 0
  dtype: Any = None
  remat: str = "none"  # per block: 'none', 'full' or 'dots_saveable' (see models/remat.py)


class TextBlock(nnx.Module):
  def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
    w, dt = cfg.width, cfg.dtype
    self.ln_1 = layers.layer_norm(w, rngs=rngs, dtype=dt)
    self.attn = layers.Attention(w, heads=cfg.heads, qkv_bias=True, rngs=rngs, dtype=dt)
    self.ln_2 = layers.layer_norm(w, rngs=rngs, dtype=dt)
    self.fc1 = layers.dense(w, w * cfg.mlp_ratio, ("embed", "mlp"), rngs=rngs, dtype=dt)
    self.fc2 = layers.dense(w * cfg.mlp_ratio, w, ("mlp", "embed"), rngs=rngs, dtype=dt)

  def __call__(self, x):
    x = x + self.attn(self.ln_1(x), is_causal=True)
    return x + self.fc2(jax.nn.gelu(self.fc1(self.ln_2(x))))


class TextEncoder(nnx.Module):
  """`encoder(tokens int32 [B, L]) -> (states [B, L, W], pooled [B, W])`."""

  def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.token_embedding = layers.embed(cfg.vocab_size, cfg.width, rngs=rngs, dtype=cfg.dtype)
    self.position_embedding = nnx.Param(
        nnx.with_partitioning(nnx.initializers.normal(0.01), (None, "embed"))(rngs.params(), (cfg.max_len, cfg.width)))
    self.blocks = nnx.List([TextBlock(cfg, rngs=rngs) for _ in range(cfg.layers)])
    self.final_layer_norm = layers.layer_norm(cfg.width, rngs=rngs, dtype=cfg.dtype)

  def __call__(self, tokens: jax.Array):
    length = tokens.shape[1]
    if length > self.config.max_len:
      raise ValueError(f"token length {length} exceeds the text encoder's max_len {self.config.max_len}")
    x = self.token_embedding(tokens) + self.position_embedding[...][None, :length]
    for block in self.blocks:
      x = remat.apply(block, self.config.remat, x)
    x = self.final_layer_norm(x)
    eot = jnp.maximum(jnp.sum(tokens != self.config.pad_id, axis=1) - 1, 0)
    pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    return x, pooled
