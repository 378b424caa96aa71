"""A denoiser with its conditioners (and, for latent diffusion, its VAE): the model a diffusion task trains.

`model.condition(batch, drop)` runs every conditioner (`models.conditioners`) and merges their entries into one
`cond` dict; `model(x_t, t, cond)` predicts the objective's target (ε, v, x_0 or a flow velocity) with a U-Net or
a DiT, which each read the entries they understand. A 'low_res' entry is concatenated to x_t as extra channels
(the denoiser's input channels must count them).
"""
from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models.dit import DiT, DiTConfig
from diffusion_jax.models.unet import UNet2DConditionModel, UNetConfig


def _with_low_res(x_t: jax.Array, cond: Mapping) -> jax.Array:
  low = cond.get("low_res")
  if low is None:
    return x_t
  low = jax.image.resize(low, (*x_t.shape[:3], low.shape[-1]), "bilinear")
  return jnp.concatenate([x_t, low.astype(x_t.dtype)], axis=-1)


class UNetDenoiser(nnx.Module):

  def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
    self.unet = UNet2DConditionModel(cfg, rngs=rngs)

  def __call__(self, x_t: jax.Array, t: jax.Array, cond: Mapping) -> jax.Array:
    return self.unet(_with_low_res(x_t, cond), t, cond.get("text_states"), class_labels=cond.get("class_labels"),
                     pooled=cond.get("text_pooled"))


class DiTDenoiser(nnx.Module):
  """A DiT conditioned on the class label and, through cross- or joint attention, the text states (no pooled
  vector: the DiT's adaLN takes time and class only)."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    self.dit = DiT(cfg, rngs=rngs)

  def __call__(self, x_t: jax.Array, t: jax.Array, cond: Mapping) -> jax.Array:
    return self.dit(_with_low_res(x_t, cond), t, class_labels=cond.get("class_labels"),
                    context=cond.get("text_states"))


class DiffusionModel(nnx.Module):

  def __init__(self, denoiser: nnx.Module, conditioners: Mapping[str, nnx.Module], vae: Optional[nnx.Module] = None):
    self.denoiser = denoiser
    self.conditioners = nnx.Dict(dict(conditioners))
    self.vae = vae  # models.vae.AutoencoderKL for latent diffusion (frozen by the task), else None

  def condition(self, batch: Mapping, drop: Optional[jax.Array] = None) -> dict:
    cond = {}
    for conditioner in self.conditioners.values():
      cond.update(conditioner(batch, drop))
    return cond

  def __call__(self, x_t: jax.Array, t: jax.Array, cond: Mapping) -> jax.Array:
    return self.denoiser(x_t, t, cond)
