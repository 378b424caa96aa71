"""DALL-E 2's autoregressive prior (Ramesh et al. 2022, section 2.1): a decoder-only LM that writes a CLIP image
embedding as a sequence of code tokens (`autoregressive.embedding_codes`: PCA coefficients, each bucketed) after the
caption.

The sequence is

  [caption tokens (text_len)] [text embedding (text_prefix slots)] [separator] [code 1] … [code C]

in one vocabulary: ids [0, bins) are the codes, `bins` the separator, and the caption's ids (the data tokenizer's)
follow from `bins + 1`. All code dimensions share the `bins` code ids: with equal-mass buckets id k means "the k-th
quantile of this coefficient" in every dimension and the learned position says which dimension is being written, so
the vocabulary stays `bins` wide rather than `components × bins` (the paper's 319 × 1024 would be 327k rows). The
caption's CLIP text embedding, layer-normalised, becomes `text_prefix` input embeddings through one linear map
(`DecoderLM`'s `embeddings=` replaces the token lookup of the whole prompt). Caption tokens are the fixed-length,
padded rows the CLIP text tower reads, so every prompt has the same length and needs no mask.

`prior(tokens, text_embeds, codes)` gives the logits of each code (teacher forcing, restricted to the code ids);
`prior.sample(...)` draws codes with classifier-free guidance through the shared KV-cache sampler.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.autoregressive import sampler
from diffusion_jax.autoregressive.guidance import GuidedDecoder
from diffusion_jax.models import layers
from diffusion_jax.models.decoder import DecoderConfig, DecoderLM


@dataclasses.dataclass(frozen=True)
class ARPriorConfig:
  """`lm.vocab_size` and `lm.max_len` are derived from the rest (`for_codes`)."""
  lm: DecoderConfig
  text_vocab: int  # the caption tokenizer's ids
  text_len: int  # caption tokens per prompt (padded)
  embed_dim: int  # the CLIP text embedding's width
  text_prefix: int  # input slots the text embedding becomes
  components: int  # code tokens per embedding
  bins: int  # ids per code token

  @classmethod
  def for_codes(cls, lm: DecoderConfig, **fields) -> "ARPriorConfig":
    """`fields` with `lm` widened to their vocabulary and sequence length."""
    vocab = fields["bins"] + 1 + fields["text_vocab"]
    length = fields["text_len"] + fields["text_prefix"] + 1 + fields["components"]
    return cls(lm=dataclasses.replace(lm, vocab_size=vocab, max_len=length), **fields)

  @property
  def prompt_len(self) -> int:
    return self.text_len + self.text_prefix + 1


class ARPrior(nnx.Module):

  def __init__(self, cfg: ARPriorConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.lm = DecoderLM(cfg.lm, rngs=rngs)
    self.text_norm = layers.layer_norm(cfg.embed_dim, rngs=rngs, dtype=cfg.lm.dtype)
    self.text_proj = layers.dense(cfg.embed_dim, cfg.text_prefix * cfg.lm.width, (None, "embed"), rngs=rngs,
                                  dtype=cfg.lm.dtype)

  def prompt(self, tokens: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """Input embeddings [B, prompt_len, width] of caption `tokens` [B, text_len] and text embeddings [B, D]."""
    cfg = self.config
    b = tokens.shape[0]
    caption = self.lm.embed_tokens(tokens + cfg.bins + 1)
    text = self.text_proj(self.text_norm(text_embeds)).reshape(b, cfg.text_prefix, cfg.lm.width)
    separator = self.lm.embed_tokens(jnp.full((b, 1), cfg.bins, jnp.int32))
    return jnp.concatenate([caption, text.astype(caption.dtype), separator], axis=1)

  def __call__(self, tokens: jax.Array, text_embeds: jax.Array, codes: jax.Array) -> jax.Array:
    """Logits [B, C, bins] of each code given the prompt and the codes before it (float32)."""
    cfg = self.config
    x = jnp.concatenate([self.prompt(tokens, text_embeds), self.lm.embed_tokens(codes[:, :-1])], axis=1)
    logits = self.lm(jnp.zeros(x.shape[:2], jnp.int32), embeddings=x)
    return logits[:, cfg.prompt_len - 1:, :cfg.bins]

  def sample(self, tokens: jax.Array, text_embeds: jax.Array, null_tokens: jax.Array, null_embeds: jax.Array,
             rng: jax.Array, *, guidance_scale: float, temperature: float,
             return_logits: bool = False) -> sampler.SampleOutput:
    """Codes [B, C] for the prompts of (`tokens`, `text_embeds`), guided away from (`null_tokens`, `null_embeds`)
    (one row, the empty caption's, or B rows); traceable."""
    cfg = self.config
    b = tokens.shape[0]
    null = self.prompt(jnp.broadcast_to(null_tokens, tokens.shape), jnp.broadcast_to(null_embeds, text_embeds.shape))
    prefill = {"embeddings": self.prompt(tokens, text_embeds), "null_embeddings": null}
    config = sampler.SamplingConfig(max_new_tokens=cfg.components, temperature=float(temperature))
    return sampler.sample_traced(GuidedDecoder(self.lm, guidance_scale, vocab=cfg.bins),
                                 jnp.zeros((b, cfg.prompt_len), jnp.int32), jnp.full((b,), cfg.prompt_len, jnp.int32),
                                 rng, prefill, config=config, return_logits=return_logits)


__all__ = ["ARPrior", "ARPriorConfig"]
