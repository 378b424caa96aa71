"""`fid`: FID (and KID, precision/recall) of a model's images against the images of its eval split, in one of three
feature spaces:

- `features='inception'`: FID's InceptionV3 (weights at `inception`: a .safetensors path, a .pth with allow_pickle);
- `features='digits'`: the independent MNIST classifier's 256-d features (the "domain" distance of `digit_accuracy`);
- `features='clip'`: the image embeddings of a finished contrastive run (`clip_workdir`; '' = the one the config
  names: `text.clip_workdir`, `dalle.clip_workdir`), scaled to length √D so that KID's kernel term x·y/D is their cosine, for images no Inception
  or digit net describes (emoji).

`source` says which images are compared with the real ones: 'samples' (class-balanced prompts over
data.class_names, generated as `sample` would), 'captions' (one image generated for each real image's caption, the
COCO protocol of text-to-image FID; a source without captions is captioned from its class names), 'heldout' (what the
model makes of each real image: an autoencoder's reconstruction, an upsampler's upsampling of its downsample, an
unCLIP decoder's variation; the rFID of VQGAN and Stable Diffusion's autoencoders), '' = the task's `fid_source` if it names one, else 'samples' where the task
generates from class names, else 'heldout'.

Options: features, inception, allow_pickle, clip_workdir, source, num_samples (images of each set, 0 = the whole
split with source='heldout'; an Inception FID needs at least 2,048), frechet (False: KID and precision/recall only, for sets smaller than the feature width), kid,
precision_recall, seed, key ('' = 'fid', 'fid_digits' or 'fid_clip'), guidance_scale (0 = sample.guidance_scale).
Metrics `<key>`, `<key>_kid`, `<key>_kid_std`, `<key>_precision`, `<key>_recall`. Inception features are computed
with each batch split over the mesh and gathered to every host.
"""
from __future__ import annotations

import os

import numpy as np
from absl import logging

from diffusion_jax.config import ConfigError
from diffusion_jax.eval import digit_classifier, fid
from diffusion_jax.evaluators import clip_scorer
from diffusion_jax.train import evaluators

FEATURES = {"inception": "fid", "digits": "fid_digits", "clip": "fid_clip"}  # feature space → default key
SOURCES = ("samples", "captions", "heldout")


def default_source(task, config) -> str:
  if getattr(task, "fid_source", ""):
    return task.fid_source
  if hasattr(task, "generate") and hasattr(task, "label_prompts") and config.data.class_names:
    return "samples"
  return "heldout" if hasattr(task, "heldout_outputs") else ""


@evaluators.register("fid")
class FID(evaluators.Evaluator):
  options = ("features", "inception", "allow_pickle", "clip_workdir", "source", "num_samples", "frechet", "kid",
             "precision_recall", "seed", "key", "guidance_scale")

  def __init__(self, name, task, config, spec):
    super().__init__(name, task, config, spec)
    self.num_samples, self.seed = int(spec.num_samples), int(spec.seed)
    self.source = spec.source or default_source(task, config)
    if self.source not in SOURCES:
      raise ConfigError(f"evals.{name}: a {config.task!r} task neither generates from class names nor makes images "
                        "of held-out ones" if not spec.source else
                        f"evals.{name}.source must be one of {SOURCES}, got {spec.source!r}")
    if self.source == "samples" and self.num_samples < 1:
      raise ConfigError(f"evals.{name}.num_samples must be at least 1 with source='samples'")
    if self.source == "samples" and not config.data.class_names:
      raise ConfigError(f"evals.{name}: source='samples' draws class-balanced prompts from data.class_names, which "
                        "this dataset does not have")
    if self.source == "samples" and not hasattr(task, "label_prompts"):
      raise ConfigError(f"evals.{name}: a {config.task!r} task does not generate images from class names")
    if self.source == "captions" and not hasattr(task, "generate"):
      raise ConfigError(f"evals.{name}: a {config.task!r} task does not generate images from captions")
    if self.source == "heldout" and not hasattr(task, "heldout_outputs"):
      raise ConfigError(f"evals.{name}: a {config.task!r} task makes no images of held-out ones; use source='samples'")
    if spec.features not in FEATURES:
      raise ConfigError(f"evals.{name}.features must be one of {tuple(FEATURES)}, got {spec.features!r}")
    self.features = spec.features
    if self.features == "inception" and not os.path.isfile(spec.inception):
      raise ConfigError(f"evals.{name}.inception={spec.inception!r} is not a file: give FID's InceptionV3 weights "
                        "(see `python -m diffusion_jax.pretrained.inception`)")
    self.key = spec.key or FEATURES[self.features]
    self.guidance_scale = float(spec.guidance_scale) or None
    self._extract = self._real = self._real_images = None
    if self.features == "clip" and self.every >= 0:  # restored now, outside this run's mesh context, so a bad path
      # fails before training; an entry switched off (every=-1) needs no CLIP run
      workdir = spec.clip_workdir or clip_scorer.own_clip_workdir(config)
      if not workdir:
        raise ConfigError(f"evals.{name}: features='clip' needs clip_workdir (a finished contrastive run) where the "
                          "config names no CLIP run (text.clip_workdir, dalle.clip_workdir)")
      clip = clip_scorer.ClipScorer(workdir, f"evals.{name}.clip_workdir", batch_size=self.batch_size)
      self._extract = lambda x, desc: clip.kid_features(x)
      width = int(clip.task.config.model.embed_dim)
      if spec.frechet and 0 < self.num_samples <= width:
        raise ConfigError(f"evals.{name}: {self.num_samples} samples give a singular {width}×{width} covariance of "
                          "CLIP features; raise num_samples or set frechet=False (KID has no such floor)")

  def _features(self, ctx, images: np.ndarray, desc: str) -> np.ndarray:
    if self._extract is None:
      if self.features == "inception":
        inception = fid.InceptionFeatures.from_file(self.spec.inception, allow_pickle=bool(self.spec.allow_pickle),
                                                    sharding=ctx.batch_sharding)
        self._extract = lambda x, desc: inception(x, desc=desc)
      else:
        judge = digit_classifier.load_or_train()
        self._extract = lambda x, desc: judge.features(x).astype(np.float64)
    return self._extract(images, desc)

  def _generated(self, ctx) -> np.ndarray:
    if self.source == "heldout":
      return self.task.heldout_outputs(ctx, self._real_images, self.seed)
    if self.source == "captions":
      return self.task.generate(ctx, self._captions, self.seed, guidance_scale=self.guidance_scale)
    n = self.num_samples
    classes = len(self.config.data.class_names)
    prompts, labels = self.task.label_prompts(-(-n // classes))
    return self.task.generate(ctx, prompts[:n], self.seed, labels=labels[:n], guidance_scale=self.guidance_scale)

  def run(self, ctx):
    if self._real is None:  # the same real images at every evaluation
      if self.source == "captions":
        real, self._captions = self.images_and_captions(ctx, self.num_samples)
      else:
        real = self.split_outputs(ctx, lambda batch: {"image": batch["image"]},
                                  max_examples=self.num_samples)["image"]
      self._real_images, self._real = real, self._features(ctx, real, "real")
    fake = self._features(ctx, self._generated(ctx), "generated")
    scores = fid.scores(self._real, fake, with_fid=bool(self.spec.frechet), with_kid=bool(self.spec.kid),
                        with_pr=bool(self.spec.precision_recall), paired=self.source == "heldout",
                        kid_subset_size=min(1000, len(self._real) // 2))  # halves of a small set: a spread
    logging.info("%s over %d real and %d %s images: %s", self.key, len(self._real), len(fake), self.source,
                 ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
    return {self.key if k == "fid" else f"{self.key}_{k}": v for k, v in scores.items()}
