"""FID, KID and precision/recall the way papers compute them, and the command line that scores a folder of images:

  python -m diffusion_jax.eval.fid --real DIR_or_NPZ --fake DIR --inception inception_fid.safetensors [--kid]
      [--precision-recall] [--save-stats OUT.npz]

Features are the 2048-d final pool of FID's InceptionV3 (`models.inception`, the TensorFlow graph pytorch-fid and
clean-fid port; weights from a path the user gives, `pretrained.inception`). Images are prepared as clean-fid's
'clean' mode does: uint8 (a saved PNG's quantisation; float images are quantised first), grayscale repeated to RGB,
each channel resized to 299×299 by PIL's bicubic filter in float, clipped to [0, 255], then mapped to the graph's
(x - 128) / 128. Statistics files are `.npz` with `mu` and `sigma`, the format pytorch-fid and clean-fid write.

The Fréchet distance is `eval.frechet`'s (scipy's matrix square root); `fid_from_features` refuses fewer images than
feature dimensions, where the covariance is singular and FID meaningless. KID is the unbiased MMD² with the cubic
polynomial kernel (x·y / d + 1)³ averaged over random subsets (Bińkowski et al. 2018; clean-fid and torch-fidelity's
defaults: 100 subsets of 1,000). Precision and recall are Kynkäänniemi et al. 2019's k-nearest-neighbour manifolds
(k = 3).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from diffusion_jax.eval import frechet, image_io
from diffusion_jax.pipelines.images import to_uint8
from diffusion_jax.models.inception import INPUT_SIZE
from diffusion_jax.parallel import host

# ---------------------------------------------------------------------------------------------------- inputs
def clean_resize(images_uint8: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
  """[N, H, W, 3] uint8 → [N, size, size, 3] float32 in [0, 255]: clean-fid's PIL bicubic resize of each channel in
  float ('F' mode), clipped."""
  out = np.empty((len(images_uint8), size, size, 3), np.float32)
  for i, image in enumerate(images_uint8):
    for c in range(3):
      channel = Image.fromarray(image[..., c].astype(np.float32), mode="F").resize((size, size), Image.BICUBIC)
      out[i, ..., c] = np.asarray(channel).clip(0, 255)
  return out


def as_rgb_uint8(images, value_range=(-1.0, 1.0)) -> np.ndarray:
  """Images [N, H, W, C] (C = 1 or 3; float in `value_range`, or uint8) as RGB uint8."""
  images = to_uint8(np.asarray(images), value_range=value_range)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"expected images [N, H, W, 1 or 3], got shape {images.shape}")
  return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def inception_inputs(images_uint8: np.ndarray) -> np.ndarray:
  """RGB uint8 images → what the graph takes: 299×299, (x - 128) / 128."""
  return (clean_resize(images_uint8) - 128.0) / 128.0


class InceptionFeatures:
  """Features of images by FID's InceptionV3 in fixed-size jitted batches (a short last batch is padded), with a
  progress bar over the batches."""

  def __init__(self, model, *, feature: str = "2048", batch_size: int = 50,
               sharding: Optional[jax.sharding.Sharding] = None):
    """`sharding`: a batch sharding over a mesh (an evaluator's `ctx.batch_sharding`): each batch is split over its
    devices (every process holds all the images) and the features gathered back to every host."""
    from flax import nnx
    graphdef, state = nnx.split(model)
    self.feature, self.sharding = feature, sharding
    devices = len(sharding.device_set) if sharding is not None else 1
    self.batch_size = -(-int(batch_size) // devices) * devices  # a whole number of rows per device
    self._fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)[feature])
    self._state = state

  def _place(self, x: np.ndarray) -> jax.Array:
    if self.sharding is None:
      return jnp.asarray(x)
    return jax.make_array_from_callback(x.shape, self.sharding, lambda index: x[index])

  @classmethod
  def from_file(cls, path: str, *, allow_pickle: bool = False, **kwargs) -> "InceptionFeatures":
    from diffusion_jax.pretrained.inception import load_inception
    return cls(load_inception(path, allow_pickle=allow_pickle), **kwargs)

  def __call__(self, images, value_range=(-1.0, 1.0), desc: str = "Inception features") -> np.ndarray:
    features = lambda chunk: self._fn(self._state, self._place(inception_inputs(chunk)))
    return host.run_chunked(features, as_rgb_uint8(images, value_range), self.batch_size,
                            desc=desc).astype(np.float64)


# ---------------------------------------------------------------------------------------------------- metrics
def fid_from_moments(mu1, sigma1, mu2, sigma2) -> float:
  return frechet.frechet_distance(np.asarray(mu1, np.float64), np.asarray(sigma1, np.float64),
                                  np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64))


def check_enough(features: np.ndarray, what: str) -> None:
  n, d = features.shape
  if n < d:
    raise ValueError(f"{what}: {n} images give a singular {d}×{d} covariance; FID needs at least {d} (use more "
                     "images, or KID, which has no such floor)")


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
  check_enough(real, "real images")
  check_enough(fake, "generated images")
  return fid_from_moments(*frechet.moments(real), *frechet.moments(fake))


def kid(real: np.ndarray, fake: np.ndarray, *, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0, paired: bool = False) -> tuple[float, float]:
  """(mean, std) over `num_subsets` random subsets of the unbiased MMD² with kernel (x·y / d + 1)³; subsets are
  drawn without replacement and shrink to the smaller set when it has fewer than `subset_size` rows. `paired`: row i
  of `fake` was made from row i of `real` (a reconstruction), so each subset pair comes from disjoint rows (at most
  half the rows each): an image meeting its own reconstruction would bias MMD² low."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  if paired and len(real) != len(fake):
    raise ValueError(f"paired KID needs as many generated rows as real ones, got {len(fake)} and {len(real)}")
  m = min(subset_size, len(real) // 2 if paired else min(len(real), len(fake)))
  if m < 2:
    raise ValueError(f"KID needs at least 2 images per set, got {len(real)} real and {len(fake)} generated")
  d = real.shape[1]
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(num_subsets):
    if paired:
      rows = rng.permutation(len(real))
      x, y = real[rows[:m]], fake[rows[m:2 * m]]
    else:
      x = real[rng.choice(len(real), m, replace=False)]
      y = fake[rng.choice(len(fake), m, replace=False)]
    k_xx, k_yy, k_xy = ((a @ b.T / d + 1.0) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))
    values.append(off(k_xx) + off(k_yy) - 2.0 * k_xy.mean())
  return float(np.mean(values)), float(np.std(values))


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  sq = np.sum(a * a, axis=1)[:, None] + np.sum(b * b, axis=1)[None, :] - 2.0 * a @ b.T
  return np.sqrt(np.maximum(sq, 0.0))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
  """Precision: the share of generated points inside the real manifold (a ball around each real point reaching its
  k-th nearest real neighbour); recall: the share of real points inside the generated manifold."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)

  def coverage(support, queries):
    # The k-th neighbour excluding the point itself: index k of the sorted distances (index 0 is the point).
    radii = np.sort(_pairwise(support, support), axis=1)[:, k]
    return float(np.mean(np.any(_pairwise(queries, support) <= radii[None, :], axis=1)))

  if min(len(real), len(fake)) <= k:
    raise ValueError(f"precision/recall with k={k} needs more than {k} images per set")
  return coverage(real, fake), coverage(fake, real)


def scores(real: np.ndarray, fake: np.ndarray, *, with_fid: bool = True, with_kid: bool = True,
           with_pr: bool = False, kid_subsets: int = 100, kid_subset_size: int = 1000,
           seed: int = 0, paired: bool = False) -> dict[str, float]:
  """FID (and KID, precision/recall) of two feature sets [N, D]; `paired` as `kid`'s."""
  out = {"fid": fid_from_features(real, fake)} if with_fid else {}
  if with_kid:
    out["kid"], out["kid_std"] = kid(real, fake, num_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed,
                                     paired=paired)
  if with_pr:
    out["precision"], out["recall"] = precision_recall(real, fake)
  return out


# ---------------------------------------------------------------------------------------------------- files
def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
  with np.load(path, allow_pickle=False) as f:
    if "mu" not in f or "sigma" not in f:
      raise ValueError(f"{path} holds {sorted(f.files)}, not the 'mu' and 'sigma' of FID statistics")
    return np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)


def read_folder(folder: str) -> np.ndarray:
  """Every image file of `folder` (sorted by name), as RGB uint8 [N, H, W, 3]; all must share one size."""
  if not os.path.isdir(folder):
    raise ValueError(f"no folder {folder}")
  names = image_io.image_files(folder)
  if not names:
    raise ValueError(f"{folder} holds no images ({', '.join(image_io.IMAGE_SUFFIXES)})")
  images = []
  for name in names:
    try:
      with Image.open(os.path.join(folder, name)) as im:
        images.append(np.asarray(im.convert("RGB")))
    except OSError as e:
      raise ValueError(f"cannot read {os.path.join(folder, name)}: {e}") from None
  sizes = {im.shape for im in images}
  if len(sizes) > 1:
    raise ValueError(f"{folder} mixes image sizes {sorted(sizes)[:3]}; resize them to one size first")
  return np.stack(images)


def main(argv: Optional[list[str]] = None, *, features_fn: Optional[Callable] = None) -> dict[str, float]:
  parser = argparse.ArgumentParser(prog="python -m diffusion_jax.eval.fid", description=__doc__.split("\n\n")[0])
  parser.add_argument("--real", required=True, help="a folder of real images, or an .npz of FID statistics")
  parser.add_argument("--fake", required=True, help="a folder of generated images")
  parser.add_argument("--inception", required=False, default="",
                      help="FID's InceptionV3 weights (.safetensors; a .pth with --allow-pickle)")
  parser.add_argument("--allow-pickle", action="store_true", help="read a .pth weights file (runs pickle code)")
  parser.add_argument("--kid", action="store_true", help="also KID (needs the real images, not statistics)")
  parser.add_argument("--precision-recall", action="store_true", help="also precision and recall (k = 3)")
  parser.add_argument("--save-stats", default="", help="write the real images' mu and sigma to this .npz")
  parser.add_argument("--batch-size", type=int, default=50)
  args = parser.parse_args(argv)
  try:
    if features_fn is None:
      if not args.inception:
        raise ValueError("--inception is required: FID's InceptionV3 weights (pytorch-fid's "
                         "pt_inception-2015-12-05-6726825d.pth, or its conversion by "
                         "`python -m diffusion_jax.pretrained.inception`)")
      features_fn = InceptionFeatures.from_file(args.inception, allow_pickle=args.allow_pickle,
                                                batch_size=args.batch_size)
    fake = features_fn(read_folder(args.fake), desc="generated")
    if args.real.endswith(".npz"):
      if args.kid or args.precision_recall or args.save_stats:
        raise ValueError("--kid, --precision-recall and --save-stats need real images, not statistics")
      check_enough(fake, "generated images")
      out = {"fid": fid_from_moments(*load_stats(args.real), *frechet.moments(fake))}
    else:
      real = features_fn(read_folder(args.real), desc="real")
      out = scores(real, fake, with_kid=args.kid, with_pr=args.precision_recall)
      if args.save_stats:
        mu, sigma = frechet.moments(real)
        np.savez(args.save_stats, mu=mu, sigma=sigma)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  for key, value in out.items():
    print(f"{key}: {value:.6g}")
  return out


if __name__ == "__main__":
  main()
