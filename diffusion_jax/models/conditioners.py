"""Conditioners: what a denoiser is conditioned on, as a dict, made from a batch's inputs.

Each conditioner reads some inputs of a batch (caption tokens, class labels, …) and returns named entries of the
`cond` dict that `denoise(x_t, t, cond)` takes:
  'text_states'  [B, L, W] token states for cross-attention (or joint attention in a DiT)
  'text_pooled'  [B, D] one vector per caption, added to the time embedding
  'class_labels' [B] int32, the null class (= num_classes) for "no label"
and, for the models to come, 'image_embedding' [B, D] (unCLIP's decoder) and 'low_res' [B, h, w, c] (an upsampler).

`drop` [B] bool replaces a row's condition by the unconditional one — the empty caption, the null class — which is
how classifier-free guidance is learned (condition dropout) and sampled (the unconditional half of the batch).
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models.text import TextEncoder, TextEncoderConfig


def _null_rows(tokens: jax.Array, null: Sequence[int], drop: Optional[jax.Array]) -> jax.Array:
  if drop is None:
    return tokens
  return jnp.where(drop[:, None], jnp.asarray(null, tokens.dtype)[None], tokens)


class TextConditioner(nnx.Module):
  """A caption encoder trained with the denoiser: tokens → text states and pooled vector."""

  def __init__(self, cfg: TextEncoderConfig, null_tokens: Sequence[int], *, rngs: nnx.Rngs):
    self.encoder = TextEncoder(cfg, rngs=rngs)
    self.null_tokens = tuple(int(t) for t in null_tokens)  # the empty caption's tokens (a static attribute)

  def __call__(self, batch: dict, drop: Optional[jax.Array] = None) -> dict:
    states, pooled = self.encoder(_null_rows(batch["tokens"], self.null_tokens, drop))
    return {"text_states": states, "text_pooled": pooled}


class FrozenTextConditioner(nnx.Module):
  """A contrastive run's text tower and projection (frozen by the task that builds it).

  The states are the final-layer-normed token states (what Stable Diffusion takes from CLIP); the pooled vector is
  the projected caption embedding, the vector CLIP trained to match images (SDXL's `text_embeds`). A batch that
  already carries them ('text_states', 'text_pooled': a latent cache) is not encoded again.
  """

  def __init__(self, tower: nnx.Module, null_tokens: Sequence[int]):
    self.tower = tower  # models.clip.CLIPTextModelWithProjection
    self.null_tokens = tuple(int(t) for t in null_tokens)

  def __call__(self, batch: dict, drop: Optional[jax.Array] = None) -> dict:
    if "text_states" in batch:
      states, pooled = batch["text_states"], batch["text_pooled"]
    else:
      states, pooled = self.tower(batch["tokens"])
    if drop is not None:
      null_states, null_pooled = self.tower(jnp.asarray(self.null_tokens, jnp.int32)[None])
      states = jnp.where(drop[:, None, None], null_states.astype(states.dtype), states)
      pooled = jnp.where(drop[:, None], null_pooled.astype(pooled.dtype), pooled)
    return {"text_states": states, "text_pooled": pooled}


class ClassConditioner(nnx.Module):
  """Class labels; unknown labels (< 0) and dropped rows become the null class, which the denoisers embed."""

  def __init__(self, num_classes: int):
    self.num_classes = num_classes

  def __call__(self, batch: dict, drop: Optional[jax.Array] = None) -> dict:
    labels = batch["label"].astype(jnp.int32)
    null = labels < 0 if drop is None else (labels < 0) | drop
    return {"class_labels": jnp.where(null, self.num_classes, labels)}
