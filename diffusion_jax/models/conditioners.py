"""Conditioners: what a denoiser is conditioned on, as a dict, made from a batch's inputs.

Each conditioner reads some inputs of a batch (caption tokens, class labels, …) and returns named entries of the
`cond` dict that `denoise(x_t, t, cond)` takes:
  'text_states'  [B, L, W] token states for cross-attention (or joint attention in a DiT)
  'text_pooled'  [B, D] one vector per caption, added to the time embedding
  'class_labels' [B] int32, the null class (= num_classes) for "no label"
  'image_embedding' [B, D] a CLIP image embedding (unCLIP's decoder), with 'image_dropped' [B] bool
and, for an upsampler, 'low_res' [B, h, w, c].

`drop` [B] bool replaces a row's condition by the unconditional one — the empty caption, the null class — which is
how classifier-free guidance is learned (condition dropout) and sampled (the unconditional half of the batch).
`DiffusionModel.condition` also takes a dict of such vectors by conditioner name, so that conditions drop
independently (unCLIP drops the image embedding and the caption at different rates).
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models.clip import clip_pixels
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


class ImageEmbeddingConditioner(nnx.Module):
  """A contrastive run's image tower and projection (frozen by the task): the CLIP image embedding of the batch's
  'image', or the batch's 'image_embedding' as given (a prior's sample, a text embedding, zeros in an ablation).

  Dropped rows (`drop`, or the batch's 'image_dropped') are flagged in 'image_dropped', not replaced: the denoiser
  puts its learned null embedding there, as DALL-E 2's decoder (Karlo's `learned_classifier_free_guidance_embeddings`).
  """

  def __init__(self, tower: nnx.Module, pixel_normalization: str):
    self.tower = tower  # models.clip.CLIPVisionModelWithProjection
    self.pixel_normalization = pixel_normalization

  def __call__(self, batch: dict, drop: Optional[jax.Array] = None) -> dict:
    if "image_embedding" in batch:
      emb = batch["image_embedding"]
    else:
      emb = self.tower.encode_image(clip_pixels(batch["image"], self.pixel_normalization))
    dropped = batch.get("image_dropped", jnp.zeros(emb.shape[:1], bool))
    if drop is not None:
      dropped = dropped | drop
    return {"image_embedding": emb.astype(jnp.float32), "image_dropped": dropped}
