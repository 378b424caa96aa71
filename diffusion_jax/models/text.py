"""A small causal text transformer that encodes captions for conditioning.

It is trained jointly with the denoiser when no pretrained text tower is given (the foundation's MNIST model);
the CLIP text tower plugs into the same place. Returns per-token states for cross-attention and a pooled
vector taken at the end-of-text position (the last non-pad token).

It is the CLIP text tower (`clip.CLIPTextModel`) configured as this encoder always was: tanh-approximated GELU and
flax's default (lecun) kernel init, so a run trains as it did before the tower was shared.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from diffusion_jax.models.clip import CLIPTextConfig, CLIPTextModel


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

  def tower(self) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=self.vocab_size, context_length=self.max_len, width=self.width,
                          layers=self.layers, heads=self.heads, mlp_dim=self.width * self.mlp_ratio, act="gelu_tanh",
                          pooling="last_non_pad", pad_token_id=self.pad_id, init="lecun", dtype=self.dtype,
                          remat=self.remat)


class TextEncoder(nnx.Module):
  """`encoder(tokens int32 [B, L]) -> (states [B, L, W], pooled [B, W])`, tokens right-padded with pad_id."""

  def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.transformer = CLIPTextModel(cfg.tower(), rngs=rngs)

  def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    length = tokens.shape[1]
    if length > self.config.max_len:
      raise ValueError(f"token length {length} exceeds the text encoder's max_len {self.config.max_len}")
    return self.transformer.encode(tokens)
