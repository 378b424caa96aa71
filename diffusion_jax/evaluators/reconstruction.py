"""Autoencoder evaluators (`tasks.autoencoder`): PSNR and SSIM (and LPIPS with the perceptual network) of
posterior-mean reconstructions.

`reconstruction`: on the eval split. Options: max_examples (0 = all). Metrics: psnr, ssim[, lpips], examples.
`photos`: on held-out scikit-image photos no training set contains, `crops` crops of each (needs scikit-image).
Options: photos (names), crops. Metrics: photos_psnr, photos_ssim[, photos_lpips], photos_examples.
"""
from __future__ import annotations

import numpy as np

from diffusion_jax.train import evaluators


def _means(measured: dict, prefix: str) -> dict[str, float]:
  scores = {k: float(np.mean(v)) for k, v in measured.items() if k not in ("image", "rec")}
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
