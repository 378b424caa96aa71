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

from diffusion_jax.config import ConfigError
from diffusion_jax.models.clip import clip_pixels
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
