"""Autoencoder evaluators (`tasks.autoencoder`): PSNR and SSIM (and LPIPS with the perceptual network) of
posterior-mean reconstructions.

`reconstruction`: on the eval split, the mean of each per-image score the task's `measure_split` gives: psnr,
ssim[, lpips] of an autoencoder, masked_psnr, psnr, loss of a masked autoencoder (`tasks.mae`). Options: max_examples
(0 = all). Metrics: those, examples.
`photos`: on held-out scikit-image photos no training set contains, `crops` crops of each (needs scikit-image).
Options: photos (names), crops. Metrics: photos_psnr, photos_ssim[, photos_lpips], photos_examples.
`codebook`: a VQ autoencoder's (or dVAE's) codes over the eval split. Options: max_examples (0 = all). Metrics: codebook_usage
(the share of the K codes used at least once), codebook_perplexity (exp of the entropy of the code histogram: K for
uniform use, 1 for a single code), codes_used, codebook_size.
"""
from __future__ import annotations

import numpy as np

from diffusion_jax.config import ConfigError
from diffusion_jax.train import evaluators


def _means(measured: dict, prefix: str) -> dict[str, float]:
  scores = {k: float(np.mean(v)) for k, v in measured.items() if np.ndim(v) == 1}  # per-image scores, not images
  return {f"{prefix}{k}": v for k, v in scores.items()} | {f"{prefix}examples": float(len(measured["psnr"]))}


@evaluators.register("reconstruction")
class Reconstruction(evaluators.Evaluator):
  options = ("max_examples",)

  def run(self, ctx):
    return _means(self.task.measure_split(ctx, self.split, self.batch_size, int(self.spec.max_examples)), "")


@evaluators.register("photos")
class Photos(evaluators.Evaluator):
  options = ("photos", "crops")

  def run(self, ctx):
    photos = self.task.photos(int(self.spec.crops), self.spec.photos)
    if photos is None:
      return {}
    return _means(self.task.measure_photos(ctx, photos, self.batch_size), "photos_")


@evaluators.register("codebook")
class Codebook(evaluators.Evaluator):
  options = ("max_examples",)

  def __init__(self, name, task, config, spec):
    super().__init__(name, task, config, spec)
    if getattr(task, "bottleneck", "") not in ("vq", "gumbel"):
      raise ConfigError(f"evals.{name}: codebook measures a discrete autoencoder (task='autoencoder', "
                        "vae.bottleneck='vq' or 'gumbel')")

  def run(self, ctx):
    tokenize = ctx.jit(lambda model, x: model.vae.tokenize(x), key=(self, "tokenize"))
    codes = self.split_outputs(ctx, lambda batch: {"codes": tokenize(batch["image"])},
                               max_examples=int(self.spec.max_examples))["codes"]
    size = int(self.config.vae.vq.codebook_size)
    counts = np.bincount(codes.reshape(-1), minlength=size)
    p = counts[counts > 0] / counts.sum()
    return {"codebook_usage": float(np.mean(counts > 0)), "codebook_perplexity": float(np.exp(-np.sum(p * np.log(p)))),
            "codes_used": float(np.sum(counts > 0)), "codebook_size": float(size)}
