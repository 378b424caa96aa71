"""A denoiser with its conditioners (and, for latent diffusion, its VAE): the model a diffusion task trains.

`model.condition(batch, drop)` runs every conditioner (`models.conditioners`) and merges their entries into one
`cond` dict; `model(x_t, t, cond)` predicts the objective's target (ε, v, x_0 or a flow velocity) with a U-Net or
a DiT, which each read the entries they understand. A 'low_res' entry is concatenated to x_t as extra channels
(the denoiser's input channels must count them).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models.dit import DiT, DiTConfig
from diffusion_jax.models.unet import UNet2DConditionModel, UNetConfig


def _image_context(text_proj, cond: Mapping):
  """unCLIP's decoder conditioning: (cross-attention context with the image embedding's extra tokens in front,
  the additive time embedding) from `text_proj` (`models.unclip.UnCLIPTextProjModel`)."""
  return text_proj(cond["image_embedding"], cond["text_pooled"], cond["text_states"],
                   drop_image=cond["image_dropped"])


def _with_low_res(x_t: jax.Array, cond: Mapping) -> jax.Array:
  low = cond.get("low_res")
  if low is None:
    return x_t
  low = jax.image.resize(low, (*x_t.shape[:3], low.shape[-1]), "bilinear")
  return jnp.concatenate([x_t, low.astype(x_t.dtype)], axis=-1)


class UNetDenoiser(nnx.Module):
  """A U-Net; with `text_proj` (unCLIP's decoder) the CLIP image embedding becomes extra context tokens and an
  addition to the time embedding (the U-Net's `pooled` input, sized to the time embedding)."""

  def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs, text_proj: Optional[nnx.Module] = None):
    self.unet = UNet2DConditionModel(cfg, rngs=rngs)
    self.text_proj = text_proj

  def __call__(self, x_t: jax.Array, t: jax.Array, cond: Mapping) -> jax.Array:
    states, pooled = cond.get("text_states"), cond.get("text_pooled")
    if self.text_proj is not None:
      states, pooled = _image_context(self.text_proj, cond)
    return self.unet(_with_low_res(x_t, cond), t, states, class_labels=cond.get("class_labels"), pooled=pooled)


class DiTDenoiser(nnx.Module):
  """A DiT conditioned on the class label and, through cross- or joint attention, the text states (no pooled
  vector: the DiT's adaLN takes time and class only)."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    self.dit = DiT(cfg, rngs=rngs)

  def __call__(self, x_t: jax.Array, t: jax.Array, cond: Mapping) -> jax.Array:
    return self.dit(_with_low_res(x_t, cond), t, class_labels=cond.get("class_labels"),
                    context=cond.get("text_states"))


class DiffusionModel(nnx.Module):

  def __init__(self, denoiser: nnx.Module, conditioners: Mapping[str, nnx.Module], vae: Optional[nnx.Module] = None,
               prior: Optional[nnx.Module] = None, upsamplers: Sequence[nnx.Module] = (),
               guide: Optional[Mapping[str, nnx.Module]] = None):
    self.denoiser = denoiser
    self.conditioners = nnx.Dict(dict(conditioners))
    self.vae = vae  # models.vae.AutoencoderKL for latent diffusion (frozen by the task), else None
    self.prior = prior  # unCLIP's PriorTransformer (frozen, from a prior run) for text → image embedding, else None
    # unCLIP's cascade: the DiffusionModels of finished upsampler runs (frozen), applied in order to the samples
    self.upsamplers = nnx.List(list(upsamplers)) if upsamplers else None
    # the sampler's gradient guides by name (tasks.guides: a noise-aware classifier, CLIP towers; frozen), else None
    self.guide = nnx.Dict(dict(guide)) if guide else None

  def condition(self, batch: Mapping, drop: Optional[jax.Array | Mapping[str, jax.Array]] = None) -> dict:
    """`drop`: one [B] bool vector for every conditioner, or one per conditioner name (missing: none dropped)."""
    cond = {}
    for name, conditioner in self.conditioners.items():
      cond.update(conditioner(batch, drop.get(name) if isinstance(drop, Mapping) else drop))
    return cond

  def __call__(self, x_t: jax.Array, t: jax.Array, cond: Mapping) -> jax.Array:
    return self.denoiser(x_t, t, cond)
