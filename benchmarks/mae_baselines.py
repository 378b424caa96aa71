"""Reference points for a masked autoencoder's masked-patch PSNR (`tasks.mae`, the `reconstruction` evaluator): the
same held-out images with 75% of their patches masked at random and filled without a model, so the model's number
reads against what needs no learning.

  python -m benchmarks.mae_baselines --config configs/mnist_mae.py --count 2000   # the first 2,000 test digits
  python -m benchmarks.mae_baselines --config configs/emoji_mae.py                # the 122 held-out emoji

'mean colour': every masked pixel takes the mean of the image's visible pixels; 'nearest patches': every masked
patch takes the inverse-square-distance-weighted mean colour of the visible patches. PSNR over the masked patches
only, pixels in [0, 1], averaged over images as the evaluator does.
"""
from __future__ import annotations

import argparse

import numpy as np

from diffusion_jax.config import load_config
from diffusion_jax.data import pipeline


def masked_psnr(images: np.ndarray, filled: np.ndarray, mask: np.ndarray, patch: int) -> float:
  """Mean over images of the PSNR over masked patches; images [N, H, W, C] in [0, 1], mask [N, g, g]."""
  pixel_mask = np.repeat(np.repeat(mask, patch, axis=1), patch, axis=2)[..., None]
  se = np.square(images - filled) * pixel_mask
  mse = se.sum(axis=(1, 2, 3)) / (pixel_mask.sum(axis=(1, 2, 3)) * images.shape[-1])
  return float(np.mean(-10.0 * np.log10(mse)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--count", type=int, default=0, help="0: the whole eval split")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  config = load_config(args.config)
  d, patch, ratio = config.data, int(config.model.patch_size), float(config.mae.mask_ratio)
  ds = pipeline.make_dataset(d, d.eval_split, global_batch_size=256, seed=0, shuffle=False, repeat=False,
                             drop_remainder=False)
  images = np.concatenate([b["image"][b["valid"] > 0] for b in ds])[: args.count or None]
  images = (np.asarray(images, np.float64) + 1.0) / 2.0
  n, size, _, channels = images.shape
  g = size // patch
  keep = int(g * g * (1 - ratio))
  rng = np.random.default_rng(args.seed)
  order = np.argsort(rng.uniform(size=(n, g * g)), axis=1)
  mask = np.ones((n, g * g))
  np.put_along_axis(mask, order[:, :keep], 0.0, axis=1)
  mask = mask.reshape(n, g, g)
  pixel_mask = np.repeat(np.repeat(mask, patch, axis=1), patch, axis=2)[..., None]

  visible_mean = (images * (1 - pixel_mask)).sum(axis=(1, 2)) / (1 - pixel_mask).sum(axis=(1, 2))
  mean_fill = np.where(pixel_mask > 0, visible_mean[:, None, None, :], images)

  patches = images.reshape(n, g, patch, g, patch, channels).mean(axis=(2, 4))  # [n, g, g, C]
  yy, xx = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
  dist2 = (yy.reshape(-1, 1) - yy.reshape(1, -1)) ** 2 + (xx.reshape(-1, 1) - xx.reshape(1, -1)) ** 2
  weights = np.where(dist2 > 0, 1.0 / np.maximum(dist2, 1), 0.0)[None] * (1 - mask.reshape(n, 1, g * g))
  colours = np.einsum("nij,njc->nic", weights, patches.reshape(n, g * g, channels)) / weights.sum(-1, keepdims=True)
  near = np.repeat(np.repeat(colours.reshape(n, g, g, channels), patch, axis=1), patch, axis=2)
  near_fill = np.where(pixel_mask > 0, near, images)

  print(f"{n} {d.eval_split} images of {args.config}, {patch} px patches, {1 - keep / (g * g):.1%} masked:")
  print(f"  mean colour:     masked PSNR {masked_psnr(images, mean_fill, mask, patch):.2f} dB")
  print(f"  nearest patches: masked PSNR {masked_psnr(images, near_fill, mask, patch):.2f} dB")


if __name__ == "__main__":
  main()
