"""Conditioners: what a denoiser is conditioned on, as a dict, made from a batch's inputs.

Each conditioner reads some inputs of a batch (caption tokens, class labels, …) and returns named entries of the
`cond` dict that `denoise(x_t, t, cond)` takes:
  'text_states'  [B, L, W] token states for cross-attention (or joint attention in a DiT)
  'text_pooled'  [B, D] one vector per caption, added to the time embedding
  'class_labels' [B] int32, the null class (= num_classes) for "no label"
  'image_embedding' [B, D] a CLIP image embedding (unCLIP's decoder), with 'image_dropped' [B] bool
and, for an upsampler, 'low_res' [B, h, w, c] (with noise augmentation also 'class_labels': the noise level).

`drop` [B] bool replaces a row's condition by the unconditional one — the empty caption, the null class — which is
how classifier-free guidance is learned (condition dropout) and sampled (the unconditional half of the batch).
`DiffusionModel.condition` also takes a dict of such vectors by conditioner name, so that conditions drop
independently (unCLIP drops the image embedding and the caption at different rates).
"""
from __future__ import annotations

import math
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


# ---------------------------------------------------------------------------------------------------- upsampling
AUGMENTATIONS = ("blur", "noise", "none")


def downsample(images: jax.Array, size: int) -> jax.Array:
  """[B, H, W, C] → [B, size, size, C]: the mean of each pixel's block (area) when `size` divides H and W, else an
  antialiased linear resize. A box, not a point sample: what a camera at the lower resolution would have seen."""
  b, h, w, c = images.shape
  if size > min(h, w):
    raise ValueError(f"cannot downsample {h}x{w} images to {size}x{size}")
  if (h, w) == (size, size):
    return images
  if h % size == 0 and w % size == 0:
    return images.reshape(b, size, h // size, size, w // size, c).mean(axis=(2, 4))
  return jax.image.resize(images, (b, size, size, c), "linear", antialias=True)


def upsample_bicubic(images: jax.Array, size: int) -> jax.Array:
  """[B, h, w, C] → [B, size, size, C] by Keys' cubic (a = -0.5, PIL's BICUBIC), clipped to [-1, 1]: the baseline
  an upsampler has to beat."""
  b, _, _, c = images.shape
  return jnp.clip(jax.image.resize(images, (b, size, size, c), "cubic"), -1.0, 1.0)


def gaussian_blur(images: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
  """Each row of [B, H, W, C] blurred by a Gaussian of its own σ (sigma [B], in pixels; 0 leaves it as it is):
  separable, `radius` taps each side, edges reflected."""
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  s = jnp.maximum(jnp.asarray(sigma, jnp.float32), 1e-6)[:, None]
  weights = jnp.exp(-0.5 * jnp.square(taps[None] / s))
  weights = weights / jnp.sum(weights, axis=-1, keepdims=True)  # [B, 2r + 1]

  def along(x, axis):
    pad = [(0, 0)] * 4
    pad[axis] = (radius, radius)
    padded = jnp.pad(x, pad, mode="reflect")
    n = x.shape[axis]
    return sum(weights[:, i, None, None, None] * jax.lax.slice_in_dim(padded, i, i + n, axis=axis)
               for i in range(2 * radius + 1))

  return along(along(images.astype(jnp.float32), 1), 2)


class LowResConditioner(nnx.Module):
  """An upsampler's conditioning image: the batch's 'low_res' (the image to upsample), or else its 'image'
  downsampled to `size` (training), corrupted by the per-row draws of `draw` that the batch may carry.

  The corruption keeps the upsampler from trusting details of its input that an earlier stage's samples lack:
    'blur'   a Gaussian blur of σ ~ U(blur_sigma) low-res pixels (DALL-E 2's first upsampler);
    'noise'  the image noised to level l ~ U{0 … L}: x·s_l + ε·√(1 - s_l²) with `noise_signal` s (s_0 = 1, clean;
             s_l = √ᾱ of the diffusion schedule's step l - 1), Imagen's noise augmentation. The level is given to the
             U-Net as its class label (as in Stable Diffusion's x4 upscaler), so it can tell how much to trust;
             sampling noises to the fixed `sample_noise_level`;
    'none'   the plain downsample.
  `drop` is ignored: an upsampler's image is never dropped.
  """

  def __init__(self, size: int, channels: int, augment: str, *, blur_sigma: Sequence[float] = (0.0, 0.0),
               noise_signal: Sequence[float] = (1.0,), sample_noise_level: int = 0):
    if augment not in AUGMENTATIONS:
      raise ValueError(f"low-res augmentation must be one of {AUGMENTATIONS}, got {augment!r}")
    self.size, self.channels, self.augment = int(size), int(channels), augment
    self.blur_sigma = tuple(float(s) for s in blur_sigma)
    self.blur_radius = max(1, math.ceil(3 * self.blur_sigma[1]))
    self.noise_signal = tuple(float(s) for s in noise_signal)  # static: indexed by the level inside jit
    self.sample_noise_level = int(sample_noise_level)

  @property
  def noise_levels(self) -> int:
    """Class labels the U-Net embeds for the noise level (0 without noise augmentation)."""
    return len(self.noise_signal) if self.augment == "noise" else 0

  def draw(self, rng: jax.Array, n: int, *, training: bool) -> dict[str, jax.Array]:
    """The corruption of n rows, as batch entries: training draws it; sampling has no blur and the fixed noise
    level (its ε still drawn)."""
    rng_level, rng_noise = jax.random.split(rng)
    if self.augment == "blur" and training:
      lo, hi = self.blur_sigma
      return {"low_res_sigma": jax.random.uniform(rng_level, (n,), jnp.float32, lo, hi)}
    if self.augment == "noise":
      if training:
        level = jax.random.randint(rng_level, (n,), 0, len(self.noise_signal), jnp.int32)
      else:
        level = jnp.full((n,), self.sample_noise_level, jnp.int32)
      noise = jax.random.normal(rng_noise, (n, self.size, self.size, self.channels), jnp.float32)
      return {"low_res_level": level, "low_res_noise": noise}
    return {}

  def __call__(self, batch: dict, drop: Optional[jax.Array] = None) -> dict:
    if "low_res" in batch:
      low = batch["low_res"].astype(jnp.float32)
    else:
      low = downsample(batch["image"].astype(jnp.float32), self.size)
    if low.shape[1:] != (self.size, self.size, self.channels):
      raise ValueError(f"the upsampler takes {self.size}x{self.size}x{self.channels} images, got "
                       f"{'x'.join(map(str, low.shape[1:]))}")
    out = {}
    if "low_res_sigma" in batch:
      low = gaussian_blur(low, batch["low_res_sigma"], self.blur_radius)
    if self.augment == "noise":
      level = batch.get("low_res_level", jnp.zeros(low.shape[:1], jnp.int32)).astype(jnp.int32)
      if "low_res_noise" in batch:
        signal = jnp.asarray(self.noise_signal, jnp.float32)[level][:, None, None, None]
        low = signal * low + jnp.sqrt(1.0 - jnp.square(signal)) * batch["low_res_noise"]
      out["class_labels"] = level
    out["low_res"] = low
    return out
