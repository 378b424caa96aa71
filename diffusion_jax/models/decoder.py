"""A decoder-only causal language model: token embedding, learned or rotary positions, the shared transformer
blocks, a final norm and an LM head (tied to the token embedding or not).

`model(tokens)` is the training pass over whole sequences; `init_cache` and `decode` are what the autoregressive
sampler (`diffusion_jax.autoregressive`) drives. DALL-E 1 (caption then image tokens, GPT-style) and LLaVA's language
model (Llama/Qwen2-style: RMSNorm, SwiGLU, RoPE, grouped-query heads, untied head) are configurations of it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.autoregressive import sampler
from diffusion_jax.models import layers, remat
from diffusion_jax.models.attention import KVCache
from diffusion_jax.models.transformer import BlockConfig, TransformerBlock, norm

POSITIONS = ("learned", "rope")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Sizes and options; the block fields mean what they mean in `transformer.BlockConfig`."""
  vocab_size: int = 256
  width: int = 128
  layers: int = 2
  heads: int = 4
  kv_heads: Optional[int] = None
  head_dim: Optional[int] = None  # None: width // heads; some checkpoints choose it apart from the width
  mlp_dim: int = 512
  act: str = "gelu"
  gated_mlp: bool = False
  norm: str = "layer"
  norm_eps: float = 1e-5
  positions: str = "learned"  # 'learned': a table added to the token embeddings; 'rope': rotary, in attention
  max_len: int = 256  # rows of the learned position table (positions are 0 .. max_len - 1)
  rope_theta: float = 10000.0
  qkv_bias: bool = True
  out_bias: bool = True
  tie_embeddings: bool = True  # logits from the token embedding matrix; False: a separate lm_head
  init: str = "lecun"
  dtype: Any = None  # compute dtype; parameters stay float32, logits are float32
  attention_impl: Optional[str] = None  # None (attention.attend picks), 'host', 'xla' or 'cudnn'
  remat: str = "none"  # per block, in the training pass: 'none', 'full' or 'dots_saveable' (see models/remat.py)

  def __post_init__(self):
    if self.positions not in POSITIONS:
      raise ValueError(f"decoder positions {self.positions!r} is not one of {POSITIONS}")
    remat.check(self.remat)
    self.block  # noqa: B018  (validates the block fields)

  @property
  def block(self) -> BlockConfig:
    return BlockConfig(width=self.width, heads=self.heads, mlp_dim=self.mlp_dim, act=self.act,
                       gated_mlp=self.gated_mlp, norm=self.norm, eps=self.norm_eps, kv_heads=self.kv_heads,
                       head_dim=self.head_dim,
                       qkv_bias=self.qkv_bias, out_bias=self.out_bias,
                       rope_theta=self.rope_theta if self.positions == "rope" else None, init=self.init,
                       depth=self.layers, dtype=self.dtype, attention_impl=self.attention_impl)


class DecoderLM(nnx.Module):
  """`model(tokens [B, T]) -> logits [B, T, vocab]`, causal; `decode` continues sequences held in a cache."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    block = cfg.block
    self.token_embedding = layers.embed(cfg.vocab_size, cfg.width, rngs=rngs, dtype=cfg.dtype)
    if cfg.positions == "learned":
      self.position_embedding = nnx.Param(nnx.with_partitioning(nnx.initializers.normal(0.01), (None, "embed"))(
          rngs.params(), (cfg.max_len, cfg.width)))
    else:
      self.position_embedding = None
    self.layers = nnx.List([TransformerBlock(block, rngs=rngs) for _ in range(cfg.layers)])
    self.final_norm = norm(block, rngs=rngs)
    self.lm_head = None if cfg.tie_embeddings else layers.dense(
        cfg.width, cfg.vocab_size, ("embed", "vocab"), use_bias=False, rngs=rngs, dtype=cfg.dtype)

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """The input embeddings of token ids [B, T] (what a vision–language model splices image features into)."""
    return self.token_embedding(tokens)

  def _embed(self, tokens: jax.Array, positions: jax.Array, embeddings: Optional[jax.Array]) -> jax.Array:
    x = self.token_embedding(tokens) if embeddings is None else embeddings
    if self.position_embedding is not None:
      # Out-of-range positions gather NaN (jnp.take's default), so an overlong sequence cannot pass unnoticed.
      x = x + jnp.take(self.position_embedding[...], positions, axis=0).astype(x.dtype)
    return x

  def _logits(self, x: jax.Array) -> jax.Array:
    b, t, w = x.shape
    x = self.final_norm(x).reshape(b * t, w)  # one GEMM, as layers.Linear does
    logits = self.token_embedding.attend(x) if self.lm_head is None else self.lm_head(x)
    return logits.reshape(b, t, -1).astype(jnp.float32)

  def __call__(self, tokens: jax.Array, positions: Optional[jax.Array] = None,
               embeddings: Optional[jax.Array] = None) -> jax.Array:
    """Logits of every next token of whole sequences (int32 [B, T]); positions [B, T] default to 0 .. T-1.
    `embeddings` [B, T, width], if given, replace the token lookup (image features spliced in by a VLM)."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = self._embed(tokens, positions, embeddings)
    for layer in self.layers:
      x = remat.apply(layer, self.config.remat, x, None, positions, is_causal=True)
    return self._logits(x)

  def init_cache(self, batch: int, max_len: int, dtype: Any = jnp.float32) -> tuple[KVCache, ...]:
    """An empty cache (one `KVCache` per block) of max_len slots: prompt plus generated tokens."""
    cfg = self.config
    if cfg.positions == "learned" and max_len > cfg.max_len:
      raise ValueError(f"a cache of {max_len} tokens needs more positions than the {cfg.max_len} this model learned")
    return tuple(layer.attn.init_cache(batch, max_len, dtype) for layer in self.layers)

  def decode(self, tokens: jax.Array, positions: jax.Array, cache: tuple[KVCache, ...],
             valid: Optional[jax.Array] = None, embeddings: Optional[jax.Array] = None
             ) -> tuple[jax.Array, tuple[KVCache, ...]]:
    """Logits [B, T, vocab] of T new tokens [B, T] at positions [B, T] after those in `cache`, and the cache with
    them appended. `valid` [B, T] marks real tokens (default all): padding of shorter prompts is never attended to.
    `embeddings` as in `__call__`."""
    x = self._embed(tokens, positions, embeddings)
    new_cache = []
    for layer, layer_cache in zip(self.layers, cache):
      x, layer_cache = layer.decode(x, layer_cache, positions=positions, valid=valid)
      new_cache.append(layer_cache)
    return self._logits(x), tuple(new_cache)

  def generate(self, input_ids: Any, max_new_tokens: int, *, lengths: Any = None, rng: Optional[jax.Array] = None,
               **sampling) -> jax.Array:
    """The prompts int32 [B, L] followed by max_new_tokens generated tokens: int32 [B, L + max_new_tokens].

    Greedy unless `sampling` (fields of `autoregressive.sampler.SamplingConfig`: temperature, top_k, top_p,
    stop_tokens, pad_id) says otherwise. Prompts of different lengths are right-padded with `lengths` [B] given;
    row b of the output holds its prompt's lengths[b] tokens, its new tokens, then pad_id.
    """
    return sampler.generate(self, input_ids, max_new_tokens, lengths=lengths, rng=rng, **sampling)


__all__ = ["DecoderConfig", "DecoderLM", "POSITIONS"]
