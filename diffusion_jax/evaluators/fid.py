"""`fid`: FID (and KID, precision/recall) of a generative task's samples against the images of its eval split, on
FID's InceptionV3 (`features='inception'`, weights at `inception`) or on the independent MNIST classifier's 256-d
features (`features='digits'`, the "domain" distance of `digit_accuracy`). Metrics `<key>`, `<key>_kid`,
`<key>_kid_std`, `<key>_precision`, `<key>_recall`.

Options: features, inception (a .safetensors path; a .pth with allow_pickle), num_samples (generated and real; an
Inception FID needs at least 2,048), kid, precision_recall, seed, key ('' = 'fid' or 'fid_digits'),
guidance_scale (0 = sample.guidance_scale). Samples are class-balanced over data.class_names (a dataset without
class names is refused for now). Inception features are computed with each batch split over the mesh and gathered to every host.
"""
from __future__ import annotations

import os

import numpy as np
from absl import logging

from diffusion_jax.config import ConfigError
from diffusion_jax.eval import digit_classifier, fid
from diffusion_jax.train import evaluators

FEATURES = ("inception", "digits")


@evaluators.register("fid")
class FID(evaluators.Evaluator):
  options = ("features", "inception", "allow_pickle", "num_samples", "kid", "precision_recall", "seed", "key",
             "guidance_scale")

  def __init__(self, name, task, config, spec):
    super().__init__(name, task, config, spec)
    if not (hasattr(task, "generate") and hasattr(task, "label_prompts")):
      raise ConfigError(f"evals.{name}: a {config.task!r} task does not generate images")
    if not config.data.class_names:
      raise ConfigError(f"evals.{name}: FID samples class-balanced prompts from data.class_names, which this dataset "
                        "does not have")
    if spec.features not in FEATURES:
      raise ConfigError(f"evals.{name}.features must be one of {FEATURES}, got {spec.features!r}")
    self.features = spec.features
    if self.features == "inception" and not os.path.isfile(spec.inception):
      raise ConfigError(f"evals.{name}.inception={spec.inception!r} is not a file: give FID's InceptionV3 weights "
                        "(see `python -m diffusion_jax.pretrained.inception`)")
    self.num_samples, self.seed = int(spec.num_samples), int(spec.seed)
    self.key = spec.key or ("fid" if self.features == "inception" else "fid_digits")
    self.guidance_scale = float(spec.guidance_scale) or None
    self._extract = self._real = None

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

  def run(self, ctx):
    n = self.num_samples
    classes = len(self.config.data.class_names)
    prompts, labels = self.task.label_prompts(-(-n // classes))
    prompts, labels = prompts[:n], labels[:n]
    fake = self.task.generate(ctx, prompts, self.seed, labels=labels, guidance_scale=self.guidance_scale)
    if self._real is None:  # the same real images at every evaluation
      real = self.split_outputs(ctx, lambda batch: {"image": batch["image"]}, max_examples=n)["image"]
      self._real = self._features(ctx, real, "real")
    scores = fid.scores(self._real, self._features(ctx, fake, "generated"), with_kid=bool(self.spec.kid),
                        with_pr=bool(self.spec.precision_recall), kid_subset_size=min(1000, n))
    logging.info("%s %.3f over %d samples", self.key, scores["fid"], n)
    return {self.key if k == "fid" else f"{self.key}_{k}": v for k, v in scores.items()}
