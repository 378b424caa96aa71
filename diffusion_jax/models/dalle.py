"""DALL-E 1's transformer (Ramesh et al. 2021): one decoder-only LM over a caption's tokens followed by an image's
grid of discrete codes (a `models.vq.VQModel`'s), in raster order.

The sequence is

  [caption tokens (text_len, padded)] [image start] [code (0, 0)] [code (0, 1)] … [code (h-1, w-1)]

in one vocabulary: ids [0, codes) are the image codes, `codes` the image-start token, and the caption's ids (the data
tokenizer's) follow from `codes + 1`. Every position has the decoder's learned position embedding; image positions
add a row and a column embedding of the grid (the paper's separate image position embeddings), so the model knows
which row and column a code lands in. `dalle(text, codes)` gives the next-token logits of the whole sequence (teacher
forcing); `dalle.sample(...)` draws codes through the shared KV-cache sampler, guided on the logits against the empty
caption ("super-conditioning", classifier-free guidance on tokens) and optionally primed with the first codes of an
image (completion). `init_cache` / `decode` make the module itself a decoder the sampler drives.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.autoregressive import sampler
from diffusion_jax.autoregressive.guidance import GuidedDecoder
from diffusion_jax.models.decoder import DecoderConfig, DecoderLM


@dataclasses.dataclass(frozen=True)
class DalleConfig:
  """`lm.vocab_size` and `lm.max_len` follow from the rest (`build`)."""
  lm: DecoderConfig
  text_vocab: int  # the caption tokenizer's ids
  text_len: int  # caption tokens per prompt (padded)
  codes: int  # the image tokenizer's codebook size
  grid: tuple[int, int]  # image tokens per column and per row (h, w)

  @classmethod
  def build(cls, lm: DecoderConfig, *, text_vocab: int, text_len: int, codes: int, grid) -> "DalleConfig":
    grid = (int(grid[0]), int(grid[1]))
    return cls(lm=dataclasses.replace(lm, vocab_size=codes + 1 + text_vocab, max_len=text_len + 1 + grid[0] * grid[1],
                                      positions="learned"),
               text_vocab=text_vocab, text_len=text_len, codes=codes, grid=grid)

  @property
  def image_len(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def prompt_len(self) -> int:
    """Caption plus the image-start token: where the first code is predicted from."""
    return self.text_len + 1


class Dalle(nnx.Module):

  def __init__(self, cfg: DalleConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.lm = DecoderLM(cfg.lm, rngs=rngs)
    init = nnx.with_partitioning(nnx.initializers.normal(0.01), (None, "embed"))
    self.row_embedding = nnx.Param(init(rngs.params(), (cfg.grid[0], cfg.lm.width)))
    self.col_embedding = nnx.Param(init(rngs.params(), (cfg.grid[1], cfg.lm.width)))

  def sequence(self, text: jax.Array, codes: jax.Array) -> jax.Array:
    """Token ids [B, text_len + 1 + N] of caption ids `text` [B, text_len] (the tokenizer's) and codes [B, N]."""
    start = jnp.full((text.shape[0], 1), self.config.codes, jnp.int32)
    return jnp.concatenate([text.astype(jnp.int32) + self.config.codes + 1, start, codes.astype(jnp.int32)], axis=1)

  def embed(self, ids: jax.Array, positions: jax.Array) -> jax.Array:
    """Input embeddings of sequence ids [B, T] at positions [B, T]: the token's, plus its grid row and column for
    image codes (the decoder adds the 1-D position)."""
    cfg = self.config
    x = self.lm.embed_tokens(ids)
    index = positions - cfg.prompt_len
    image = (index >= 0)[..., None]
    index = jnp.clip(index, 0, cfg.image_len - 1)
    grid = (jnp.take(self.row_embedding[...], index // cfg.grid[1], axis=0)
            + jnp.take(self.col_embedding[...], index % cfg.grid[1], axis=0))
    return x + jnp.where(image, grid, 0.0).astype(x.dtype)

  def __call__(self, text: jax.Array, codes: jax.Array) -> jax.Array:
    """Logits [B, T - 1, vocab] of every next token of the sequence of (text, codes) (float32): position i predicts
    token i + 1, so `[:, :text_len - 1]` are the caption's and `[:, text_len:]` the codes'."""
    ids = self.sequence(text, codes)[:, :-1]
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return self.lm(ids, positions, embeddings=self.embed(ids, positions))

  # ------------------------------------------------------------------ the decoder the sampler drives
  def init_cache(self, batch: int, max_len: int, dtype: Any = jnp.float32):
    return self.lm.init_cache(batch, max_len, dtype)

  def decode(self, tokens: jax.Array, positions: jax.Array, cache, valid: Optional[jax.Array] = None,
             embeddings: Optional[jax.Array] = None):
    if embeddings is None:
      embeddings = self.embed(tokens, positions)
    return self.lm.decode(tokens, positions, cache, valid=valid, embeddings=embeddings)

  def sample(self, text: jax.Array, null_text: jax.Array, rng: jax.Array, *, guidance_scale: float,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             prefix: Optional[jax.Array] = None) -> jax.Array:
    """Codes [B, N] for captions `text` [B, text_len] guided away from `null_text` (the empty caption, one row or B),
    continuing the given first codes `prefix` [B, P] if any (returned in place); traceable."""
    cfg = self.config
    b = text.shape[0]
    given = 0 if prefix is None else prefix.shape[1]
    if given >= cfg.image_len:
      raise ValueError(f"a prefix of {given} codes leaves nothing to draw of an image of {cfg.image_len}")
    empty = jnp.zeros((b, 0), jnp.int32)
    prefix = empty if prefix is None else prefix.astype(jnp.int32)
    prompt = self.sequence(text, prefix)
    null = self.sequence(jnp.broadcast_to(null_text, text.shape), prefix)
    config = sampler.SamplingConfig(max_new_tokens=cfg.image_len - given, temperature=float(temperature),
                                    top_k=int(top_k), top_p=float(top_p))
    out = sampler.sample_traced(GuidedDecoder(self, guidance_scale, vocab=cfg.codes), prompt,
                                jnp.full((b,), prompt.shape[1], jnp.int32), rng, {"null_tokens": null},
                                config=config)
    return jnp.concatenate([prefix, out.tokens], axis=1)


__all__ = ["Dalle", "DalleConfig"]
