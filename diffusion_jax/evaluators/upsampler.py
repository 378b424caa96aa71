"""`upsampler`: PSNR and SSIM of an upsampler (`tasks.upsampler`) against the originals, next to bicubic upsampling's,
on held-out images downsampled to the upsampler's input size.

The images are read in batches of the entry's batch_size and upsampled in chunks of `sample.batch_size` (the
program `--mode sample` uses). Options: max_examples (images of the split; 0 = all), photos (scikit-image photo names, `eval.image_metrics`; () =
none), crops (per photo), seed (the sampling noise). Metrics: upsampler_psnr, bicubic_psnr, upsampler_ssim,
bicubic_ssim, examples, and with photos the same with a photos_ prefix. SSIM is Wang et al.'s 11×11 Gaussian window
(`eval.image_metrics.ssim`), so images need 11 px or more.
"""
from __future__ import annotations

import numpy as np

from diffusion_jax.config import ConfigError
from diffusion_jax.train import evaluators


def _means(measured: dict, prefix: str) -> dict[str, float]:
  out = {f"{prefix}{k}": float(np.mean(v)) for k, v in measured.items()}
  return out | {f"{prefix}examples": float(len(measured["upsampler_psnr"]))}


@evaluators.register("upsampler")
class Upsampler(evaluators.Evaluator):
  options = ("max_examples", "photos", "crops", "seed")

  def __init__(self, name, task, config, spec):
    super().__init__(name, task, config, spec)
    if not hasattr(task, "measure_images"):
      raise ConfigError(f"evals.{name}: the upsampler evaluator measures task='upsampler', not a {config.task!r} task")

  def run(self, ctx):
    seed, batch = int(self.spec.seed), self.batch_size
    images = self.task.heldout_images(ctx, int(self.spec.max_examples), split=self.split, batch_size=batch)
    out = _means(self.task.measure_images(ctx, images, seed), "")
    if self.spec.photos:
      photos = self.task.photos(self.spec.photos, int(self.spec.crops))
      out |= _means(self.task.measure_images(ctx, photos, seed), "photos_")
    return out
