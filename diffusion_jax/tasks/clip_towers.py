"""The towers of a finished contrastive (CLIP) run, reused frozen by the tasks built on CLIP's spaces: text-to-image
diffusion (its text tower), unCLIP's prior (both) and decoder (both).

  source = clip_towers.run_source('text.clip_workdir', workdir, ('text', 'image'), target='clip', data=config.data)
  clip_config = source.task().model_config      # CLIPConfig: .text, .vision, .embed_dim
  pixels = clip_towers.pixels(source, images)  # [-1, 1] pipeline images as that run's image tower takes them

A task that tokenizes captions for the text tower must tokenize them as the run did: the same tokenizer and padded
length, checked here in one line rather than found later as garbage embeddings.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx

from diffusion_jax.config import ConfigError
from diffusion_jax.data import tokenizers
from diffusion_jax.models.clip import CLIPTextModelWithProjection, CLIPVisionModelWithProjection, clip_pixels
from diffusion_jax.train import runs

# Parameter names of each tower in the run's CLIPModel, and in transformers' *WithProjection classes.
TOWERS = {"text": ("text_model", "text_projection"), "image": ("vision_model", "visual_projection")}


def run_source(what: str, workdir: str, towers: Sequence[str], *, target: str, data) -> runs.RunSource:
  """A frozen `RunSource` of `towers` ('text', 'image') of the contrastive run in `workdir`, placed under `target`.

  With the text tower, `data` (this run's data config) must tokenize as that run did.
  """
  if not workdir:
    raise ConfigError(f"{what} is empty: give a finished contrastive run (e.g. configs/mnist_clip.py)")
  select = tuple(name for tower in towers for name in TOWERS[tower])
  source = runs.RunSource(what, workdir, task="contrastive", select=select, target=target, frozen=True)
  if "text" in towers:
    saved = source.config().data
    if (data.tokenizer, data.max_text_len) != (saved.tokenizer, saved.max_text_len):
      raise ConfigError(f"data.tokenizer={data.tokenizer!r} and data.max_text_len={data.max_text_len} must match "
                        f"the text tower's ({saved.tokenizer!r}, {saved.max_text_len}) from {what}")
  return source


def pixels(source: runs.RunSource, images: jax.Array) -> jax.Array:
  """Pipeline images in [-1, 1] normalised as the run's image tower was trained on them."""
  return clip_pixels(images, source.config().model.pixel_normalization)


class ClipTowers(nnx.Module):
  """Both towers of a CLIP run under the run's own parameter names, so its checkpoint fills them by name."""

  def __init__(self, clip, *, rngs: nnx.Rngs):
    text = CLIPTextModelWithProjection(clip.text, clip.embed_dim, rngs=rngs)
    image = CLIPVisionModelWithProjection(clip.vision, clip.embed_dim, rngs=rngs)
    self.text_model, self.text_projection = text.text_model, text.text_projection
    self.vision_model, self.visual_projection = image.vision_model, image.visual_projection

  def encode_text(self, input_ids: jax.Array) -> jax.Array:
    return self.text_projection(self.text_model.encode(input_ids)[1])

  def encode_image(self, pixels: jax.Array) -> jax.Array:
    return self.visual_projection(self.vision_model(pixels)[1])


class FrozenClip:
  """Both towers of the contrastive run in `workdir` as a frozen, unrecorded part of another run's model (under
  `target`: a guide, a reranker), with what scoring with them needs: that run's own tokenizer and caption length
  (the host run's captions may be tokenized otherwise), image size and pixel normalisation. `purpose` names the use
  in the one-line error for a run without CLIP projections."""

  def __init__(self, what: str, workdir: str, *, target: str, purpose: str):
    self.source = runs.RunSource(what, workdir, task="contrastive", select=TOWERS["text"] + TOWERS["image"],
                                 target=target, frozen=True, recorded=False)
    saved = self.source.config()
    self.config = self.source.task().model_config
    if self.config.projections != "clip":
      raise ConfigError(f"{what}: {purpose} takes a run with projections='clip', not {self.config.projections!r}")
    self.tokenizer = tokenizers.get_tokenizer(saved.data.tokenizer)
    self.max_text_len = int(saved.data.max_text_len)
    self.image_size = int(saved.data.image_size)
    self.pixel_normalization = saved.model.pixel_normalization

  def build(self, rngs: nnx.Rngs) -> ClipTowers:
    return ClipTowers(self.config, rngs=rngs)

  def tokens(self, prompts: Sequence[str]) -> np.ndarray:
    return np.asarray(self.tokenizer(list(prompts), self.max_text_len), np.int32)

  def embed_images(self, towers: ClipTowers, images: jax.Array) -> jax.Array:
    """Image embeddings of pipeline images in [-1, 1] at any size (resized to the run's); traceable."""
    size = self.image_size
    if images.shape[1:3] != (size, size):
      images = jax.image.resize(images, (images.shape[0], size, size, images.shape[-1]), "linear")
    return towers.encode_image(clip_pixels(images, self.pixel_normalization))
