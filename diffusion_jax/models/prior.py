"""The unCLIP prior (Ramesh et al. 2022, DALL-E 2; Kakao's Karlo): a causal transformer that denoises a CLIP image
embedding conditioned on the caption's CLIP text embedding and token states. Shaped like diffusers' `PriorTransformer`.

The sequence is [text tokens (optional), projected text embedding, time step embedding, noised image embedding,
learned "prd" token], each projected to the model width, plus learned positions; the prd token's final state is
projected to the predicted image embedding (x_0 or epsilon, whichever the prior was trained on). Submodule and
parameter names follow diffusers so that `pretrained/prior.py` maps a checkpoint by name.

Two diffusers behaviours are kept because checkpoints depend on them: the causal mask is applied only together with a
text mask (`attention_mask=None` means full attention over the sequence; pass an all-True mask for a causal prior
without padding), and without a prd token the output is the state of every token from the image embedding on.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers
from diffusion_jax.models.attention import Attention
from diffusion_jax.models.transformer import ACTIVATIONS, MLP

# diffusers' `get_activation` table, which `time_embed_act_fn` names.
TIME_ACTIVATIONS = {"silu": ACTIVATIONS["silu"], "swish": ACTIVATIONS["silu"], "gelu": ACTIVATIONS["gelu"],
                    "relu": jax.nn.relu, "mish": jax.nn.mish}
_CHOICES = {"norm_in_type": (None, "layer"), "embedding_proj_norm_type": (None, "layer"),
            "encoder_hid_proj_type": (None, "linear"), "added_emb_type": (None, "prd")}
# Karlo initialises the learned positions and the prd token N(0, 0.01); diffusers' zeros are only placeholders that
# its checkpoints overwrite, and would start every position alike.
_EMBEDDING_INIT = nnx.initializers.normal(0.01)


@dataclasses.dataclass(frozen=True)
class PriorConfig:
  """diffusers' `PriorTransformer` arguments (defaults: Karlo's prior, ViT-L/14 embeddings) and our compute options."""
  num_attention_heads: int = 32
  attention_head_dim: int = 64
  num_layers: int = 20
  embedding_dim: int = 768  # width of the image embedding fed in (and of text token states)
  num_embeddings: int = 77  # text tokens (or, without text, image embedding tokens) the positions cover
  additional_embeddings: int = 4  # further tokens: text embedding, time, image embedding, prd
  time_embed_act_fn: str = "silu"
  norm_in_type: Optional[str] = None  # 'layer': a layer norm after adding the positions
  embedding_proj_norm_type: Optional[str] = None  # 'layer': a layer norm on the text embedding input
  encoder_hid_proj_type: Optional[str] = "linear"  # None: the prior takes no text token states
  added_emb_type: Optional[str] = "prd"  # None: no prd token
  time_embed_dim: Optional[int] = None  # None: the model width
  embedding_proj_dim: Optional[int] = None  # width of the text embedding input; None: embedding_dim
  clip_embed_dim: Optional[int] = None  # width of the output; None: embedding_dim
  dtype: Any = None  # compute dtype; parameters and the output stay float32
  attention_impl: Optional[str] = None  # None (attention.attend picks), 'host', 'xla' or 'cudnn'

  def __post_init__(self):
    if self.time_embed_act_fn.lower() not in TIME_ACTIVATIONS:
      raise ValueError(f"time_embed_act_fn {self.time_embed_act_fn!r} is not one of {sorted(TIME_ACTIVATIONS)}")
    for field, allowed in _CHOICES.items():
      if getattr(self, field) not in allowed:
        raise ValueError(f"{field}={getattr(self, field)!r} is not one of {allowed}")

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def num_positions(self) -> int:
    return self.num_embeddings + self.additional_embeddings

  @property
  def output_dim(self) -> int:
    return self.clip_embed_dim or self.embedding_dim


class TimestepEmbedding(nnx.Module):
  """diffusers' `TimestepEmbedding`: linear_1 → activation → linear_2, on sinusoidal frequencies (model width)."""

  def __init__(self, cfg: PriorConfig, *, rngs: nnx.Rngs):
    d, hidden = cfg.inner_dim, cfg.time_embed_dim or cfg.inner_dim
    self.act = cfg.time_embed_act_fn.lower()
    self.linear_1 = layers.dense(d, hidden, ("embed", "mlp"), rngs=rngs, dtype=cfg.dtype)
    self.linear_2 = layers.dense(hidden, d, ("mlp", "embed"), rngs=rngs, dtype=cfg.dtype)

  def __call__(self, freqs: jax.Array) -> jax.Array:
    return self.linear_2(TIME_ACTIVATIONS[self.act](self.linear_1(freqs)))


class PriorBlock(nnx.Module):
  """diffusers' `BasicTransformerBlock` as the prior builds it: pre-norm self-attention and a GELU MLP."""

  def __init__(self, cfg: PriorConfig, *, rngs: nnx.Rngs):
    d, dt = cfg.inner_dim, cfg.dtype
    self.norm1 = layers.layer_norm(d, rngs=rngs, dtype=dt)
    self.attn1 = Attention(d, heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim, qkv_bias=True,
                           rngs=rngs, dtype=dt, implementation=cfg.attention_impl)
    self.norm3 = layers.layer_norm(d, rngs=rngs, dtype=dt)
    init = nnx.initializers.lecun_normal()
    self.ff = MLP(d, 4 * d, "gelu", in_init=init, out_init=init, rngs=rngs, dtype=dt)

  def __call__(self, x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
    x = x + self.attn1(self.norm1(x), mask=mask)
    return x + self.ff(self.norm3(x))


def _param(init, shape, axes, rngs: nnx.Rngs) -> nnx.Param:
  return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape))


class PriorTransformer(nnx.Module):
  """`prior(hidden_states, timestep, proj_embedding, encoder_hidden_states=None, attention_mask=None)`.

  hidden_states [B, embedding_dim] (or [B, N, embedding_dim]) is the noised image embedding, timestep [B] or a
  scalar, proj_embedding [B, embedding_proj_dim] the caption's CLIP text embedding, encoder_hidden_states
  [B, L, embedding_dim] its token states (required when `encoder_hid_proj_type` is set) and attention_mask [B, L]
  bool, True for real tokens. Returns float32 [B, clip_embed_dim], the prd token's prediction; without a prd token,
  [B, N, clip_embed_dim] for the tokens from the image embedding on, as diffusers.

  `clip_mean` / `clip_std` [1, clip_embed_dim] hold the statistics of the embeddings the prior was trained on
  (`post_process_latents` maps a sample back to CLIP space, `normalize` the other way). They start as the identity
  (0, 1) for training from scratch; `__call__` does not use them, so a task should keep them out of the optimizer.
  """

  def __init__(self, cfg: PriorConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    d, dt = cfg.inner_dim, cfg.dtype
    self.time_embedding = TimestepEmbedding(cfg, rngs=rngs)
    self.proj_in = layers.dense(cfg.embedding_dim, d, (None, "embed"), rngs=rngs, dtype=dt)
    proj_dim = cfg.embedding_proj_dim or cfg.embedding_dim
    self.embedding_proj_norm = (layers.layer_norm(proj_dim, rngs=rngs, dtype=dt)
                                if cfg.embedding_proj_norm_type == "layer" else None)
    self.embedding_proj = layers.dense(proj_dim, d, (None, "embed"), rngs=rngs, dtype=dt)
    self.encoder_hidden_states_proj = (layers.dense(cfg.embedding_dim, d, (None, "embed"), rngs=rngs, dtype=dt)
                                       if cfg.encoder_hid_proj_type == "linear" else None)
    self.positional_embedding = _param(_EMBEDDING_INIT, (1, cfg.num_positions, d), (None, None, "embed"), rngs)
    self.prd_embedding = (_param(_EMBEDDING_INIT, (1, 1, d), (None, None, "embed"), rngs)
                          if cfg.added_emb_type == "prd" else None)
    self.transformer_blocks = nnx.List([PriorBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.norm_in = layers.layer_norm(d, rngs=rngs, dtype=dt) if cfg.norm_in_type == "layer" else None
    self.norm_out = layers.layer_norm(d, rngs=rngs, dtype=dt)
    self.proj_to_clip_embeddings = layers.dense(d, cfg.output_dim, ("embed", None), rngs=rngs, dtype=dt)
    self.clip_mean = _param(nnx.initializers.zeros_init(), (1, cfg.output_dim), (None, None), rngs)
    self.clip_std = _param(nnx.initializers.ones_init(), (1, cfg.output_dim), (None, None), rngs)

  def _tokens(self, hidden_states, timestep, proj_embedding, encoder_hidden_states):
    """The input sequence [B, S, width] and the number of tokens before the image embedding."""
    cfg = self.config
    dtype = cfg.dtype or jnp.float32
    b = hidden_states.shape[0]
    t = jnp.broadcast_to(jnp.asarray(timestep), (b,))
    freqs = layers.timestep_embedding(t, cfg.inner_dim, flip_sin_to_cos=True, downscale_freq_shift=0.0)
    time = self.time_embedding(freqs.astype(dtype))
    if self.embedding_proj_norm is not None:
      proj_embedding = self.embedding_proj_norm(proj_embedding)
    proj = self.embedding_proj(proj_embedding.astype(dtype))
    pieces = []
    if self.encoder_hidden_states_proj is not None:
      if encoder_hidden_states is None:
        raise ValueError("this prior projects text token states (encoder_hid_proj_type='linear'); pass "
                         "encoder_hidden_states")
      pieces.append(self.encoder_hidden_states_proj(encoder_hidden_states.astype(dtype)))
    elif encoder_hidden_states is not None:  # diffusers then uses them unprojected
      pieces.append(encoder_hidden_states.astype(dtype))
    as_tokens = lambda x: x[:, None] if x.ndim == 2 else x
    pieces += [as_tokens(proj), time[:, None]]
    before_image = sum(p.shape[1] for p in pieces)
    pieces.append(as_tokens(self.proj_in(hidden_states.astype(dtype))))
    if self.prd_embedding is not None:
      pieces.append(jnp.broadcast_to(self.prd_embedding[...].astype(dtype), (b, 1, cfg.inner_dim)))
    return jnp.concatenate(pieces, axis=1), before_image

  def _positions(self, length: int, before_image: int, dtype) -> jax.Array:
    """The learned positions; a table shorter than the sequence covers the image embedding tokens only (diffusers
    pads it with zeros for the tokens before them and the prd token, as Shap-E's prior needs)."""
    pos = self.positional_embedding[...].astype(dtype)
    if pos.shape[1] < length:
      pos = jnp.pad(pos, ((0, 0), (before_image, 1 if self.prd_embedding is not None else 0), (0, 0)))
    if pos.shape[1] != length:
      raise ValueError(f"the input has {length} tokens but the prior has {self.config.num_positions} positions "
                       "(num_embeddings + additional_embeddings)")
    return pos

  def _mask(self, attention_mask: Optional[jax.Array], length: int) -> Optional[jax.Array]:
    """[B, 1, S, S]: causal attention to the real text tokens and every later token, or None (see the module doc).

    diffusers adds -10000 to the logits of masked keys; that weight underflows to exactly 0 next to any allowed key,
    so a boolean mask gives the same result. A masked text token with only masked tokens before it has no allowed
    key at all; no masked token's state reaches an unmasked one, so it attends to itself (no kernel then sees an
    empty row, which some turn into NaN) without changing the output.
    """
    if attention_mask is None:
      return None
    valid = jnp.pad(attention_mask.astype(bool), ((0, 0), (0, self.config.additional_embeddings)),
                    constant_values=True)
    if valid.shape[1] != length:
      raise ValueError(f"attention_mask covers {attention_mask.shape[1]} text tokens + additional_embeddings="
                       f"{self.config.additional_embeddings}, but the sequence has {length} tokens")
    causal = jnp.tril(jnp.ones((length, length), bool))
    allowed = valid[:, None, :] & causal[None]
    allowed = allowed | (jnp.eye(length, dtype=bool)[None] & ~allowed.any(-1, keepdims=True))
    return allowed[:, None]

  def __call__(self, hidden_states: jax.Array, timestep: jax.Array, proj_embedding: jax.Array,
               encoder_hidden_states: Optional[jax.Array] = None,
               attention_mask: Optional[jax.Array] = None) -> jax.Array:
    x, before_image = self._tokens(hidden_states, timestep, proj_embedding, encoder_hidden_states)
    x = x + self._positions(x.shape[1], before_image, x.dtype)
    mask = self._mask(attention_mask, x.shape[1])
    if self.norm_in is not None:
      x = self.norm_in(x)
    for block in self.transformer_blocks:
      x = block(x, mask)
    x = self.norm_out(x)
    x = x[:, -1] if self.prd_embedding is not None else x[:, before_image:]
    return self.proj_to_clip_embeddings(x).astype(jnp.float32)

  def post_process_latents(self, x: jax.Array) -> jax.Array:
    """A sample of the prior (normalised embedding space) → CLIP image embedding space."""
    return x * self.clip_std[...] + self.clip_mean[...]

  def normalize(self, x: jax.Array) -> jax.Array:
    """CLIP image embeddings → the normalised space the prior is trained in (inverse of `post_process_latents`)."""
    return (x - self.clip_mean[...]) / self.clip_std[...]


__all__ = ["PriorBlock", "PriorConfig", "PriorTransformer", "TIME_ACTIVATIONS", "TimestepEmbedding"]
