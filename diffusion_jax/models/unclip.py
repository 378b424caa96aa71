"""The unCLIP decoder's conditioning (Ramesh et al. 2022, section 2.1), diffusers' `UnCLIPTextProjModel`.

A CLIP image embedding conditions the decoder two ways: projected and added to the time step embedding (with the
projected CLIP text embedding), and projected into a few extra context tokens prepended to the text encoder's token
states. For classifier-free guidance the image embedding is swapped for a learned one; `drop_image` says where,
and `guidance_batch` builds the doubled batch diffusers' pipeline makes. Parameter names follow diffusers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers


@dataclasses.dataclass(frozen=True)
class UnCLIPTextProjConfig:
  """diffusers' `UnCLIPTextProjModel` arguments (Karlo: 768-wide embeddings, 4 tokens) and the compute dtype."""
  time_embed_dim: int
  cross_attention_dim: int
  clip_extra_context_tokens: int = 4
  clip_embeddings_dim: int = 768
  dtype: Any = None  # compute dtype; parameters stay float32


class UnCLIPTextProjModel(nnx.Module):
  """`text_proj(image_embeddings, prompt_embeds, text_encoder_hidden_states, *, drop_image=None)`.

  image_embeddings and prompt_embeds [B, clip_embeddings_dim], text_encoder_hidden_states [B, L, cross_attention_dim];
  drop_image [B] bool puts the learned guidance embedding in place of the image embedding where True (the
  unconditional rows of classifier-free guidance, or embedding dropout in training). Returns the decoder's context
  [B, clip_extra_context_tokens + L, cross_attention_dim] and the time embedding to add, [B, time_embed_dim].
  """

  def __init__(self, cfg: UnCLIPTextProjConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    c, t, x, dt = cfg.clip_embeddings_dim, cfg.time_embed_dim, cfg.cross_attention_dim, cfg.dtype
    self.learned_classifier_free_guidance_embeddings = nnx.Param(
        nnx.with_partitioning(nnx.initializers.zeros_init(), (None,))(rngs.params(), (c,)))
    self.embedding_proj = layers.dense(c, t, (None, "embed"), rngs=rngs, dtype=dt)
    self.clip_image_embeddings_project_to_time_embeddings = layers.dense(c, t, (None, "embed"), rngs=rngs, dtype=dt)
    self.clip_extra_context_tokens_proj = layers.dense(c, cfg.clip_extra_context_tokens * x, (None, "embed"),
                                                       rngs=rngs, dtype=dt)
    self.encoder_hidden_states_proj = layers.dense(c, x, (None, "embed"), rngs=rngs, dtype=dt)
    self.text_encoder_hidden_states_norm = layers.layer_norm(x, rngs=rngs, dtype=dt)

  def __call__(self, image_embeddings: jax.Array, prompt_embeds: jax.Array, text_encoder_hidden_states: jax.Array,
               *, drop_image: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    cfg = self.config
    if drop_image is not None:
      learned = self.learned_classifier_free_guidance_embeddings[...]
      image_embeddings = jnp.where(drop_image[:, None], learned[None].astype(image_embeddings.dtype),
                                   image_embeddings)
    time = self.clip_image_embeddings_project_to_time_embeddings(image_embeddings) + self.embedding_proj(prompt_embeds)
    # diffusers reshapes the projection to [B, width, tokens]: channel c of token k is output c * tokens + k.
    extra = self.clip_extra_context_tokens_proj(image_embeddings)
    extra = extra.reshape(extra.shape[0], cfg.cross_attention_dim, cfg.clip_extra_context_tokens).transpose(0, 2, 1)
    text = self.text_encoder_hidden_states_norm(self.encoder_hidden_states_proj(text_encoder_hidden_states))
    return jnp.concatenate([extra, text], axis=1), time


def guidance_batch(image_embeddings: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(image_embeddings twice [2B, D], drop_image [2B]: True for the first B rows): diffusers'
  `do_classifier_free_guidance=True`, which puts the learned embedding first. Pair it with prompt embeddings and
  token states ordered [unconditional, conditional], as diffusers' pipeline does."""
  b = image_embeddings.shape[0]
  return jnp.concatenate([image_embeddings, image_embeddings]), jnp.arange(2 * b) < b


__all__ = ["UnCLIPTextProjConfig", "UnCLIPTextProjModel", "guidance_batch"]
