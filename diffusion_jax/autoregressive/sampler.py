"""Sampling token sequences from a causal decoder with a key/value cache.

  sampler = Sampler(model)       # a models.decoder.DecoderLM, or any module with its init_cache and decode
  out = sampler(prompts, config=SamplingConfig(max_new_tokens=32, temperature=0.8, top_p=0.95, stop_tokens=(2,)),
                rng=jax.random.key(0))
  out.tokens, out.lengths        # int32 [B, 32] (pad_id after a row's stop token), [B]

As flax's examples/gemma/sampler.py does it: the sampler is separate from the model, the cache is an explicit
pytree passed in and out of `model.decode`, the prompts are prefilled in one call and the new tokens come one per
iteration of a `jax.lax.while_loop`, which ends early once every row has produced a stop token. The whole of it is
one `jax.jit` program, compiled once per (batch, prompt length) shape and `SamplingConfig`.

Prompts of different lengths are right-padded, as the tokenizers here return them: row b holds its prompt in
columns [0, lengths[b]) and anything after. The padding goes into the cache marked invalid, so no row attends to it;
every row's generated tokens then take the same cache slots, at positions that continue its own prompt.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick each token. Temperature, then top-k, then top-p, as transformers' `generate` applies them."""
  max_new_tokens: int
  temperature: float = 0.0  # 0: greedy (the most likely token, top_k/top_p unused); > 0 divides the logits
  top_k: int = 0  # > 0: sample among the k most likely tokens only
  top_p: float = 1.0  # < 1: sample from the smallest set of most likely tokens whose probability reaches top_p
  stop_tokens: tuple[int, ...] = ()  # a row ends after generating any of them (the stop token is kept)
  pad_id: int = 0  # fills a row after its stop token

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got {self.temperature}, "
                       f"{self.top_k}, {self.top_p}")
    object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))  # hashable for jit


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleOutput:
  tokens: jax.Array  # int32 [B, max_new_tokens]; pad_id after a row's stop token
  lengths: jax.Array  # int32 [B]: tokens generated per row, its stop token included
  logits: Optional[jax.Array]  # float32 [B, max_new_tokens, vocab]: the model's, before temperature; if asked


def sample_logits(logits: jax.Array, rng: jax.Array, config: SamplingConfig) -> jax.Array:
  """One token per row of logits [B, vocab] (float32) as `config` says: int32 [B]."""
  if config.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / config.temperature
  if config.top_k:
    kth = jax.lax.top_k(logits, min(config.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if config.top_p < 1:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    # A token stays while the tokens more likely than it hold less than top_p: the most likely always stays.
    kept = jnp.cumsum(probs, axis=-1) - probs < config.top_p
    threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class Sampler:
  """`sampler(prompts, lengths=None, *, config, rng=None, return_logits=False) -> SampleOutput`.

  The model is any NNX module with `init_cache(batch, max_len, dtype)` and `decode(tokens, positions, cache, valid)
  -> (logits, cache)`, as `models.decoder.DecoderLM`. Its parameters are split off once; assign `sampler.state` (an
  `nnx.state(model)` of the same structure) to sample with other values without recompiling.
  """

  def __init__(self, model: nnx.Module, *, cache_dtype: Any = jnp.float32):
    self.graphdef, self.state = nnx.split(model)
    self.cache_dtype = jnp.dtype(cache_dtype)

  def __call__(self, prompts: Any, lengths: Any = None, *, config: SamplingConfig, rng: Optional[jax.Array] = None,
               return_logits: bool = False, prefill: Optional[dict] = None) -> SampleOutput:
    """prompts int32 [B, P], right-padded; lengths [B] (default: the tokens that are not config.pad_id).

    `prefill`: keyword arrays for the model's `decode` on the prompt only (a VLM's `pixel_values`)."""
    prompts = np.asarray(prompts, np.int32)
    lengths = np.sum(prompts != config.pad_id, axis=1) if lengths is None else np.asarray(lengths, np.int32)
    if prompts.ndim != 2 or lengths.shape != prompts.shape[:1]:
      raise ValueError(f"need prompts [batch, length] and lengths [batch]; got {prompts.shape} and {lengths.shape}")
    if lengths.min() < 1 or lengths.max() > prompts.shape[1]:
      raise ValueError(f"every prompt needs 1 to {prompts.shape[1]} tokens; lengths are {lengths.tolist()}")
    if rng is None:
      if config.temperature:
        raise ValueError("sampling at a temperature needs an rng")
      rng = jax.random.key(0)  # greedy decoding draws nothing
    return _sample(self.state, prompts, lengths, rng, dict(prefill or {}), graphdef=self.graphdef,
                   cache_dtype=self.cache_dtype, config=config, return_logits=return_logits)


def generate(model: nnx.Module, input_ids: Any, max_new_tokens: int, *, lengths: Any = None,
             rng: Optional[jax.Array] = None, prefill: Optional[dict] = None, **sampling) -> np.ndarray:
  """`model.generate` of the decoders here: prompts [B, L] and their continuations, int32 [B, L + max_new_tokens].

  Row b holds its prompt's first lengths[b] tokens (default all L), its generated tokens, then `pad_id`.
  """
  prompts = np.asarray(input_ids, np.int32)
  if prompts.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {prompts.shape}")
  lengths = np.full(prompts.shape[:1], prompts.shape[1], np.int32) if lengths is None else np.asarray(lengths)
  config = SamplingConfig(max_new_tokens=max_new_tokens, **sampling)
  out = Sampler(model)(prompts, lengths, config=config, rng=rng, prefill=prefill)
  tokens = np.asarray(out.tokens)
  result = np.full((prompts.shape[0], prompts.shape[1] + max_new_tokens), config.pad_id, np.int32)
  for b, n in enumerate(lengths):
    result[b, :n] = prompts[b, :n]
    result[b, n:n + max_new_tokens] = tokens[b]
  return result


# One compiled program per (model graph, shapes, SamplingConfig), shared by every Sampler of the same model.
@functools.partial(jax.jit, static_argnames=("graphdef", "cache_dtype", "config", "return_logits"))
def _sample(state, prompts, prompt_lengths, rng, prefill, *, graphdef, cache_dtype, config: SamplingConfig,
            return_logits: bool):
  return sample_traced(nnx.merge(graphdef, state), prompts, prompt_lengths, rng, prefill, cache_dtype=cache_dtype,
                       config=config, return_logits=return_logits)


def sample_traced(model, prompts: jax.Array, prompt_lengths: jax.Array, rng: jax.Array, prefill: Optional[dict] = None,
                  *, config: SamplingConfig, cache_dtype: Any = jnp.float32, return_logits: bool = False
                  ) -> SampleOutput:
  """The sampling program itself, for a caller that is already being traced (a task's compiled text → embedding
  chain): `model` is the module (or any object with `init_cache` and `decode`), the arrays may be tracers, and
  nothing is checked or compiled here. `Sampler` is the checked, compiled entry point around it."""
  (batch, prompt_len), steps = prompts.shape, config.max_new_tokens
  prefill = dict(prefill or {})
  # The last generated token is never fed back, so the cache needs one slot less than prompt + new tokens.
  cache = model.init_cache(batch, prompt_len + steps - 1, cache_dtype)
  positions = jnp.broadcast_to(jnp.arange(prompt_len), prompts.shape)
  logits, cache = model.decode(prompts, positions, cache, valid=positions < prompt_lengths[:, None], **prefill)
  last = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]

  def record(step, logits, progress):
    """`progress` = (tokens, lengths, done, logits so far) with token number `step` drawn from `logits` [B, V]."""
    tokens, lengths, done, seen = progress
    token = jnp.where(done, config.pad_id, sample_logits(logits, jax.random.fold_in(rng, step), config))
    lengths = jnp.where(done, lengths, step + 1)
    if config.stop_tokens:
      done = done | jnp.isin(token, jnp.asarray(config.stop_tokens, jnp.int32))
    seen = None if seen is None else seen.at[:, step].set(logits)
    return tokens.at[:, step].set(token), lengths, done, seen

  def cond(carry):
    step, (_, _, done, _), _ = carry
    return (step < steps) & ~jnp.all(done)

  def body(carry):
    step, progress, cache = carry
    tokens, _, done, _ = progress
    previous = jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1)
    logits, cache = model.decode(previous, prompt_lengths[:, None] + step - 1, cache, valid=~done[:, None])
    return step + 1, record(step, logits[:, 0], progress), cache

  nothing = (jnp.full((batch, steps), config.pad_id, jnp.int32), jnp.zeros((batch,), jnp.int32),
             jnp.zeros((batch,), bool),
             jnp.zeros((batch, steps, last.shape[-1]), jnp.float32) if return_logits else None)
  carry = (jnp.asarray(1), record(0, last, nothing), cache)
  _, (tokens, lengths, _, seen), _ = jax.lax.while_loop(cond, body, carry)
  return SampleOutput(tokens=tokens, lengths=lengths, logits=seen)


__all__ = ["SampleOutput", "Sampler", "SamplingConfig", "generate", "sample_logits", "sample_traced"]
