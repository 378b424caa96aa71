"""Classifier-free guidance on a causal decoder's logits, as a decoder the sampler drives unchanged.

  guided = GuidedDecoder(lm, scale=2.0, vocab=64)
  out = sampler.sample_traced(guided, prompts, lengths, rng, {"embeddings": cond, "null_embeddings": uncond},
                              config=SamplingConfig(max_new_tokens=16, temperature=1.0))

Every row runs twice through the model in one batch of 2B rows — under its own prompt and under the unconditional
one — sharing the generated tokens, each half with its own cache rows. The logits the sampler sees are
`u + scale · (c − u)` (scale 1: the conditional model; 0: the unconditional one), as GLIDE and DALL-E 2 guide token
models. Guiding raw logits or log-probabilities is the same: they differ by a constant per row, which softmax
ignores. `vocab` keeps only the first `vocab` token ids (the rest get −inf), for a model whose vocabulary also holds
prompt-only tokens that must never be generated.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp


class GuidedDecoder:
  """`init_cache` and `decode` of `model` (a `models.decoder.DecoderLM`) with guided logits; see the module doc.

  The prompt step (`decode` with `embeddings`) takes the unconditional prompt as `null_embeddings` (or `null_tokens`
  for token prompts); later steps feed both halves the same new tokens.
  """

  def __init__(self, model, scale: float, vocab: Optional[int] = None):
    self.model, self.scale, self.vocab = model, scale, vocab

  def init_cache(self, batch: int, max_len: int, dtype: Any = jnp.float32):
    return self.model.init_cache(2 * batch, max_len, dtype)

  def decode(self, tokens: jax.Array, positions: jax.Array, cache, valid: Optional[jax.Array] = None,
             embeddings: Optional[jax.Array] = None, null_embeddings: Optional[jax.Array] = None,
             null_tokens: Optional[jax.Array] = None):
    if (embeddings is None) != (null_embeddings is None):
      raise ValueError("a guided prompt given as embeddings needs null_embeddings as well (and vice versa)")
    both = lambda x, null=None: None if x is None else jnp.concatenate([x, x if null is None else null])
    logits, cache = self.model.decode(both(tokens, null_tokens), both(positions), cache, valid=both(valid),
                                      embeddings=both(embeddings, null_embeddings))
    cond, uncond = jnp.split(logits, 2)
    guided = uncond + self.scale * (cond - uncond)
    if self.vocab is not None:
      guided = jnp.where(jnp.arange(guided.shape[-1]) < self.vocab, guided, -jnp.inf)
    return guided, cache


__all__ = ["GuidedDecoder"]
