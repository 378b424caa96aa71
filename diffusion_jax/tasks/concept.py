"""Concept fine-tuning (DreamBooth, Ruiz et al. 2023): teach a finished text-to-image run a new subject from a
handful of images, named in prompts by a rare word, while prior preservation keeps what its class prompts draw.

`task='concept'` (e.g. configs/mnist_concept.py) with a finished diffusion run as `lora.base_workdir`:
  concept.images            a folder of the subject's images (.png, .jpg, .jpeg, .webp, .bmp; '' = the bundled
                            example, five hand-drawn stars, diffusion_jax/assets/concept_star)
  concept.prompt            the prompt they train with, holding the rare identifier ('a handwritten digit sks');
                            refused when every token of it is already one the base run trained on
  concept.class_prompt      the prior: a prompt, or a template over data.class_names ('a handwritten digit {name}')
  concept.num_class_images  images of the prior, drawn from the base model before the first step (its guided
                            sampler, `sample.*`) and kept in WORKDIR/class_images.npz, with a look at them in
                            WORKDIR/class_images/; 0 (or class_prompt '') trains without prior preservation
  concept.prior_loss_weight their weight in the loss, λ of DreamBooth's instance + λ · prior objective
Training rows are the subject's images (repeated) and the prior's in equal numbers, shuffled together; the loss is
the base run's diffusion loss with each row weighted. With `lora.rank` > 0 only adapters train; `--mode sample` and
the end of training also write them as a diffusers LoRA file (pytorch_lora_weights.safetensors) beside the samples.
The `concept` evaluator (`evaluators.concept`) judges whether samples of the prompt show the subject.
"""
from __future__ import annotations

import math
import os
from importlib import resources
from typing import Any

import jax
import numpy as np
from absl import logging

from diffusion_jax.config import ConfigError
from diffusion_jax.data import pipeline
from diffusion_jax.data.records import NO_LABEL, DataError
from diffusion_jax.data.transforms import DecodeImage, FitImage, fill_template
from diffusion_jax.eval import image_io
from diffusion_jax.tasks.diffusion import DiffusionTask
from diffusion_jax.train import workdir
from diffusion_jax.train.task import ModelContext, register

CLASS_FILE = "class_images.npz"


def example_images() -> str:
  """The bundled example subject: five hand-drawn stars (diffusion_jax/assets/concept_star/make_star.py)."""
  return str(resources.files("diffusion_jax") / "assets" / "concept_star")


def read_images(folder: str, size: int, channels: int) -> np.ndarray:
  """uint8 [N, size, size, channels]: every image file in `folder`, decoded and fitted as the data pipeline does."""
  if not os.path.isdir(folder):
    raise DataError(f"concept.images={folder!r} is not a folder")
  files = image_io.image_files(folder)
  if not files:
    raise DataError(f"concept.images={folder!r} holds no image ({', '.join(image_io.IMAGE_SUFFIXES)})")
  decode, fit, images = DecodeImage(channels), FitImage(size), []
  for name in files:
    with open(os.path.join(folder, name), "rb") as f:
      image = fit.map(decode.map({"image": f.read()}))["image"]
    if image is None:
      raise DataError(f"{os.path.join(folder, name)} is not a readable image")
    images.append(image)
  return np.stack(images)


def to_model_range(images: np.ndarray) -> np.ndarray:
  return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


@register("concept")
class ConceptTask(DiffusionTask):
  base_tasks = ("diffusion", "text_to_image_diffusion")

  def __init__(self, config):
    super().__init__(config)
    c = config.concept
    if not c.prompt:
      raise ConfigError("task='concept' needs concept.prompt, the prompt naming the subject by a rare word "
                        "(e.g. 'a handwritten digit sks')")
    if c.num_class_images < 0 or c.prior_loss_weight < 0:
      raise ConfigError("concept.num_class_images and concept.prior_loss_weight must be >= 0")
    if "clip_image" in self.conditioner_names or "low_res" in self.conditioner_names:
      raise ConfigError("task='concept' fine-tunes a text-to-image run (conditioners 'text' or 'clip_text')")
    self.images_dir = c.images or example_images()
    self.class_prompts = self._class_prompts()
    self._check_identifier()
    self.rows = None
    self._images = None

  def _class_prompts(self) -> tuple[list[str], np.ndarray]:
    """The prior's prompts and labels, balanced over data.class_names when class_prompt is a template."""
    c, d = self.config.concept, self.config.data
    n = int(c.num_class_images) if c.class_prompt else 0
    if "{name}" in c.class_prompt:
      labels = (np.arange(n) % len(d.class_names)).astype(np.int32)
      return [fill_template(c.class_prompt, int(l), d.class_names) for l in labels], labels
    return [c.class_prompt] * n, np.full(n, NO_LABEL, np.int32)

  def _check_identifier(self) -> None:
    """DreamBooth's identifier must be a word the base model has no meaning for: a prompt made only of tokens the
    training captions use (a hashed-word collision included) would teach the subject to an existing word."""
    d = self.config.data
    trained = {fill_template(t, i, d.class_names) for t in d.caption_templates for i in range(len(d.class_names))}
    known = set(np.unique(self.tokenizer(sorted(trained), d.max_text_len)))
    mine = set(np.unique(self.tokenizer([self.config.concept.prompt], d.max_text_len)))
    if mine <= known:
      raise ConfigError(f"concept.prompt={self.config.concept.prompt!r}: every token of it is one the training "
                        "captions use, so it names nothing new; add a rare word such as 'sks'")

  def concept_images(self) -> np.ndarray:
    """The subject's images, float32 [-1, 1] [N, H, W, C]."""
    if self._images is None:
      d = self.config.data
      self._images = to_model_range(read_images(self.images_dir, int(d.image_size), int(d.channels)))
    return self._images

  def check_run(self) -> None:
    self.concept_images()
    if self.config.latent.cache:
      raise ConfigError("task='concept' encodes its few images in the step: set latent.cache=False")

  # ------------------------------------------------------------------ the prior's images
  def _meta(self) -> dict:
    c, s = self.config.concept, self.config.sample
    base = self.config.lora.base_workdir
    return dict(base=os.path.abspath(base) if base else "", class_prompt=c.class_prompt,
                num_class_images=len(self.class_prompts[0]), seed=int(c.seed), sampler=s.sampler,
                num_steps=int(s.num_steps), guidance_scale=float(s.guidance_scale), image_shape=list(self.shape))

  def _class_images(self, ctx: ModelContext) -> dict[str, np.ndarray]:
    prompts, labels = self.class_prompts

    def make():
      images = self.generate(ctx, prompts, int(self.config.concept.seed), labels=labels)
      if ctx.is_main_process:
        look = os.path.join(ctx.workdir, "class_images")
        image_io.save_samples(image_io.new_sample_dir(os.path.dirname(look), os.path.basename(look)), images,
                              prompts, grid_cols=min(len(prompts), 10))
      return {"image": images, "label": labels}

    return workdir.sampled_once(os.path.join(ctx.workdir, CLASS_FILE), self._meta(), make, step=ctx.step,
                                is_main=ctx.is_main_process, what="class images")

  def prepare(self, ctx: ModelContext, *, training: bool) -> None:
    super().prepare(ctx, training=training)
    if not training:
      return
    subject = self.concept_images()
    prompts, labels = self.class_prompts
    prior = self._class_images(ctx) if prompts else {"image": subject[:0], "label": labels}
    # As many subject rows as prior rows (at least a batch): DreamBooth's half-and-half batches, on average.
    repeats = math.ceil(max(len(prompts), int(self.config.train.batch_size)) / len(subject))
    n = repeats * len(subject)
    tokens = self.prompt_inputs([self.config.concept.prompt] * n + prompts)["tokens"]
    self.rows = {
        "image": np.concatenate([np.tile(subject, (repeats, 1, 1, 1)), np.asarray(prior["image"], np.float32)]),
        "tokens": tokens,
        "label": np.concatenate([np.full(n, NO_LABEL, np.int32), np.asarray(prior["label"], np.int32)]),
        "weight": np.concatenate([np.ones(n, np.float32),
                                  np.full(len(prompts), float(self.config.concept.prior_loss_weight), np.float32)]),
        "valid": np.ones(n + len(prompts), np.float32)}
    logging.info("concept: %d images of %r (×%d) and %d prior images of %r", len(subject),
                 self.config.concept.prompt, repeats, len(prompts), self.config.concept.class_prompt)

  def train_dataset(self, ctx: ModelContext, *, global_batch_size: int, seed: int):
    return pipeline.make_array_dataset(self.rows, global_batch_size=global_batch_size, seed=seed,
                                       process_index=jax.process_index(), process_count=jax.process_count())

  def row_weights(self, batch):
    return batch["valid"] * batch["weight"] if "weight" in batch else batch["valid"]

  # ------------------------------------------------------------------ samples and the adapter file
  def sample(self, ctx: ModelContext, out_dir: str) -> dict[str, Any]:
    info = super().sample(ctx, out_dir)
    if ctx.is_main_process and self.denoiser == "unet" and self.config.lora.rank:
      from diffusion_jax.pretrained.lora import save_diffusers_lora
      path = save_diffusers_lora(ctx.merge().denoiser.unet, out_dir)
      logging.info("wrote the adapters to %s (%.1f KiB)", path, os.path.getsize(path) / 1024)
      info["lora_file"] = path
    return info
