"""Multi-head attention for every model here: self or cross, grouped-query heads, rotary positions, and a key/value
cache passed in and out as a pytree for autoregressive decoding.

Parameters are named as in flax and big_vision (`query`, `key`, `value`, `out`); `diffusion_jax.pretrained` maps
them to diffusers' `to_q/to_k/to_v/to_out.0` and transformers' `q_proj/k_proj/v_proj/out_proj`. The projections are
`layers.Linear`, which flattens [B, N, D] inputs into one GEMM (a DiT training step twice as fast on XLA:CPU).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers

Dtype = Any
# `host_attention` loops over (batch, head) pairs when all the scores would take more than HOST_LOOP_BYTES, this
# many bytes of scores per iteration: small enough to stay in a CPU's cache between the two matmuls and the
# softmax. Chosen on a 2-core EPYC at the sizes of benchmarks/sd_sampling.py --shape sd.
HOST_SCORE_BYTES = 4 << 20
HOST_LOOP_BYTES = 64 << 20


def host_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array] = None,
                   is_causal: bool = False) -> jax.Array:
  """softmax(q·kᵀ/√d)·v in the layout of `jax.nn.dot_product_attention` (q [B, T, N, H], k/v [B, S, K, H], K
  dividing N, mask broadcastable to [B, N, T, S]), written for a CPU.

  XLA's own attention materialises the [B, N, T, S] probabilities, copies them into the layout its second matmul
  wants, and normalises them in a pass of their own. At 1024 latent positions with 8-wide heads (a 32×32 Stable
  Diffusion U-Net level) that is memory traffic, not arithmetic. Here the heads come first, the normalisation
  divides the [.., T, H] output instead of the [.., T, S] probabilities, and when the scores would not stay in
  cache the (batch, head) pairs go through a loop a few at a time: 29 ms against XLA's 60 ms and PyTorch's fused
  kernel's 43 ms at batch 8 × 8 heads on the 2-core CPU (`python -m benchmarks.cpu_kernels`).
  """
  b, t, n, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  # [B, K, G·T, H]: the G query heads sharing a key/value head are rows of one matmul.
  qh = (q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, t, kh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, d)
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  allowed = None
  if mask is not None:
    allowed = jnp.broadcast_to(mask, (b, n, t, s)).reshape(b, kh, g * t, s)
  if is_causal:
    causal = jnp.tril(jnp.ones((t, s), bool))  # jax.nn.dot_product_attention's convention
    causal = jnp.broadcast_to(causal, (b, kh, g, t, s)).reshape(b, kh, g * t, s)
    allowed = causal if allowed is None else allowed & causal

  def softmax_attend(qq, kk, vv, ok):
    scores = jnp.einsum("...qd,...kd->...qk", qq, kk, preferred_element_type=jnp.float32)
    if ok is not None:
      scores = jnp.where(ok, scores, jnp.finfo(jnp.float32).min)
    # Any shift gives the same softmax; the row maximum keeps exp() finite and carries no gradient.
    p = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
    out = jnp.einsum("...qk,...kd->...qd", p.astype(vv.dtype), vv, preferred_element_type=jnp.float32)
    return (out / p.sum(-1, keepdims=True)).astype(q.dtype)

  pairs = b * kh
  per_pair = g * t * s * 4
  if pairs * per_pair <= HOST_LOOP_BYTES:
    out = softmax_attend(qh, kt, vt, allowed)
  else:
    flat = lambda x: None if x is None else x.reshape(pairs, *x.shape[2:])
    chunk = max(1, HOST_SCORE_BYTES // per_pair)
    out = jax.lax.map(lambda a: softmax_attend(*a), (flat(qh), flat(kt), flat(vt), flat(allowed)), batch_size=chunk)
  return out.reshape(b, kh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array] = None, is_causal: bool = False,
           implementation: Optional[str] = None) -> jax.Array:
  """Multi-head attention by `implementation`: 'host' (`host_attention`), or 'xla' / 'cudnn' (jax's kernels).
  None picks 'host' on CPU and lets `jax.nn.dot_product_attention` choose elsewhere."""
  with jax.named_scope("attention"):  # names the ops in profiles (benchmarks/op_profile.py)
    if implementation == "host" or (implementation is None and jax.default_backend() == "cpu"):
      return host_attention(q, k, v, mask, is_causal)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=implementation)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding of x [B, T, heads, head_dim] at integer positions [B, T] (Su et al. 2021).

  Llama's convention ("rotate half"): channel i is paired with channel i + head_dim/2 and both are rotated by the
  angle position · theta^(-2i/head_dim), so checkpoints of Llama-family models load without permuting q/k rows.
  Computed in float32 whatever the compute dtype: bfloat16 angles are wrong by whole turns at long positions.
  """
  half = x.shape[-1] // 2
  inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [B, T, 1, half]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """The keys and values one attention layer has seen, in a fixed number of slots (static shapes under jit).

  Every row advances together: a call with T new tokens writes slots [end, end + T) of all rows. Rows of different
  lengths pad their prompts; `valid` says which written slots hold real tokens, so padding is never attended to
  and a row's result does not depend on the others'.
  """
  k: jax.Array  # [B, S, kv_heads, head_dim]
  v: jax.Array  # [B, S, kv_heads, head_dim]
  valid: jax.Array  # bool [B, S]
  end: jax.Array  # int32 []: the number of slots written

  @classmethod
  def empty(cls, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype: Dtype = jnp.float32) -> "KVCache":
    shape = (batch, max_len, kv_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, max_len), bool),
               jnp.zeros((), jnp.int32))

  def update(self, k: jax.Array, v: jax.Array, valid: jax.Array) -> tuple["KVCache", jax.Array]:
    """Appends T keys/values [B, T, kv_heads, head_dim] (`valid` [B, T]); returns the new cache and the mask
    [B, 1, T, S] of the T new queries: the valid slots up to their own, causally.

    Writing past the last slot is not checked under jit (XLA clamps the index): size the cache for the prompt plus
    every token to be generated.
    """
    at = (0, self.end, 0, 0)
    new = KVCache(jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), at),
                  jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), at),
                  jax.lax.dynamic_update_slice(self.valid, valid, at[:2]), self.end + k.shape[1])
    slots = self.end + jnp.arange(k.shape[1])[:, None]  # [T, 1]
    keys = jnp.arange(self.k.shape[1])[None, :]  # [1, S]
    # A padding query sees itself, so that no row of the mask is empty (some kernels return NaN for one).
    mask = (new.valid[:, None, :] | (keys == slots)[None]) & (keys <= slots)[None]
    return new, mask[:, None]


class Attention(nnx.Module):
  """Multi-head attention through `attend` (`implementation` picks the kernel: 'host', 'xla', 'cudnn'; None: the
  backend's best).

  heads query heads share kv_heads key/value heads (grouped-query attention; default kv_heads = heads).
  `context_dim` sizes the key/value inputs of cross-attention. `rope_theta` rotates queries and keys of
  self-attention by their positions (RoPE); without it positions are the model's business (learned or fixed
  embeddings added to the tokens). `kernel_init` initialises q/k/v, `out_kernel_init` (default: the same) the output
  projection, so each model keeps its own scheme.
  """

  def __init__(self, dim: int, *, heads: int, kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
               context_dim: Optional[int] = None, qkv_bias: bool = False, out_bias: bool = True,
               kernel_init: Callable = nnx.initializers.lecun_normal(), out_kernel_init: Optional[Callable] = None,
               rope_theta: Optional[float] = None, rngs: nnx.Rngs, dtype: Dtype = None,
               implementation: Optional[str] = None):
    kv_heads = kv_heads or heads
    if heads % kv_heads:
      raise ValueError(f"heads {heads} is not a multiple of kv_heads {kv_heads}")
    head_dim = head_dim or dim // heads
    if rope_theta is not None and head_dim % 2:
      raise ValueError(f"rotary positions need an even head_dim, got {head_dim}")
    context_dim = context_dim or dim
    self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
    self.rope_theta, self.implementation = rope_theta, implementation

    def proj(d_in, d_out, axes, bias, init):
      return layers.dense(d_in, d_out, axes, use_bias=bias, kernel_init=init, rngs=rngs, dtype=dtype)

    self.query = proj(dim, heads * head_dim, ("embed", "heads"), qkv_bias, kernel_init)
    self.key = proj(context_dim, kv_heads * head_dim, ("embed", "heads"), qkv_bias, kernel_init)
    self.value = proj(context_dim, kv_heads * head_dim, ("embed", "heads"), qkv_bias, kernel_init)
    self.out = proj(heads * head_dim, dim, ("heads", "embed"), out_bias, out_kernel_init or kernel_init)

  def _project(self, x: jax.Array, context: jax.Array, positions: Optional[jax.Array]):
    split = lambda t, n: t.reshape(*t.shape[:2], n, self.head_dim)
    q = split(self.query(x), self.heads)
    k, v = split(self.key(context), self.kv_heads), split(self.value(context), self.kv_heads)
    if self.rope_theta is not None:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
      q, k = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)
    return q, k, v

  def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array],
              is_causal: bool = False) -> jax.Array:
    out = attend(q, k, v, mask, is_causal, self.implementation)
    return self.out(out.reshape(*q.shape[:2], -1))

  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None, *, positions: Optional[jax.Array] = None,
               mask: Optional[jax.Array] = None, is_causal: bool = False) -> jax.Array:
    """x [B, T, dim] attending to itself, or to `context` [B, S, context_dim]; positions [B, T] for RoPE
    (default 0..T-1); mask broadcastable to [B, heads, T, S], True where attention is allowed."""
    if context is not None and self.rope_theta is not None:
      raise ValueError("rotary positions apply to self-attention; this layer was given a context")
    q, k, v = self._project(x, x if context is None else context, positions)
    return self._attend(q, k, v, mask, is_causal)

  def init_cache(self, batch: int, max_len: int, dtype: Dtype = jnp.float32) -> KVCache:
    return KVCache.empty(batch, max_len, self.kv_heads, self.head_dim, dtype)

  def decode(self, x: jax.Array, cache: KVCache, *, positions: jax.Array,
             valid: Optional[jax.Array] = None) -> tuple[jax.Array, KVCache]:
    """Causal self-attention of T new tokens x [B, T, dim] at `positions` [B, T] over the cache and themselves.

    `valid` [B, T] marks real tokens (default all); padding is written but never attended to. Returns the output
    and the cache with the new keys and values appended.
    """
    q, k, v = self._project(x, x, positions)
    cache, mask = cache.update(k, v, jnp.ones(x.shape[:2], bool) if valid is None else valid)
    return self._attend(q, cache.k.astype(q.dtype), cache.v.astype(q.dtype), mask), cache


class SpatialSelfAttention(Attention):
  """Self-attention over the H·W positions of an NHWC feature map, with a group norm in front (optional) and a
  residual around it: diffusers' `Attention(residual_connection=True)` of the VAE and of `UNet2DModel`."""

  def __init__(self, channels: int, *, heads: int = 1, groups: Optional[int], epsilon: float, rngs: nnx.Rngs,
               dtype: Dtype = None, implementation: Optional[str] = None):
    super().__init__(channels, heads=heads, qkv_bias=True, out_bias=True, rngs=rngs, dtype=dtype,
                     implementation=implementation)
    self.group_norm = layers.group_norm(channels, groups, epsilon=epsilon, rngs=rngs, dtype=dtype) if groups else None

  def __call__(self, x: jax.Array, normed: Optional[jax.Array] = None) -> jax.Array:
    """`normed`: the input as a caller normalised it otherwise (MoVQ's spatial norm), in place of the group norm;
    the residual is always the raw input, as diffusers' attention processors take it."""
    b, h, w, c = x.shape
    if normed is None:
      normed = x if self.group_norm is None else self.group_norm(x)
    return x + super().__call__(normed.reshape(b, h * w, c)).reshape(b, h, w, c)


__all__ = ["Attention", "KVCache", "SpatialSelfAttention", "attend", "host_attention", "rope"]
