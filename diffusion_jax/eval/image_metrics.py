"""Full-reference image quality: PSNR and SSIM per image, in JAX so they run inside a jitted evaluation.

SSIM is Wang et al. (2004) as their reference code computes it: an 11×11 Gaussian window (σ = 1.5), population
(co)variances, K1 = 0.01, K2 = 0.03, averaged over the window positions that lie wholly inside the image (no
padding) and over channels. That equals `skimage.metrics.structural_similarity(a, b, data_range=...,
channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`; scikit-image's default
(7×7 uniform window, sample covariance) gives other numbers, so papers' SSIMs are only comparable with this one.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # window radius int(3.5 σ + 0.5) = 5, scipy/scikit-image's convention: an 11×11 window
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _gaussian_window_matrix(size: int, sigma: float, radius: int) -> np.ndarray:
  """[size - 2r, size] matrix whose rows are the normalised 1-D Gaussian at each fully inside position.

  Filtering along an axis is then one matmul; the separable 2-D window is two of them.
  """
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  g = np.exp(-0.5 * (x / sigma) ** 2)
  g /= g.sum()
  out = np.zeros((size - 2 * radius, size), np.float64)
  for i in range(size - 2 * radius):
    out[i, i:i + 2 * radius + 1] = g
  return out.astype(np.float32)


@functools.partial(jax.jit, static_argnames=("data_range", "sigma"))
def ssim(a: jax.Array, b: jax.Array, data_range: float = 1.0, sigma: float = SSIM_SIGMA) -> jax.Array:
  """Per-image SSIM of two [N, H, W, C] batches (or one [H, W, C] image) in [0, data_range]; returns [N] or []."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  if a.shape != b.shape:
    raise ValueError(f"ssim needs images of one shape, got {a.shape} and {b.shape}")
  single = a.ndim == 3
  if single:
    a, b = a[None], b[None]
  if a.ndim != 4:
    raise ValueError(f"ssim expects [N, H, W, C] or [H, W, C] images, got shape {a.shape}")
  radius = int(SSIM_TRUNCATE * sigma + 0.5)
  h, w = a.shape[1:3]
  if min(h, w) < 2 * radius + 1:
    raise ValueError(f"images of {h}x{w} are smaller than the {2 * radius + 1}x{2 * radius + 1} SSIM window")
  gh = jnp.asarray(_gaussian_window_matrix(h, sigma, radius))
  gw = jnp.asarray(_gaussian_window_matrix(w, sigma, radius))

  def blur(x):
    return jnp.einsum("ih,nhwc,jw->nijc", gh, x, gw, precision=jax.lax.Precision.HIGHEST)

  mu_a, mu_b = blur(a), blur(b)
  var_a = blur(a * a) - mu_a * mu_a
  var_b = blur(b * b) - mu_b * mu_b
  cov = blur(a * b) - mu_a * mu_b
  c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
  ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
  out = jnp.mean(ssim_map, axis=(1, 2, 3))
  return out[0] if single else out


def psnr(a: jax.Array, b: jax.Array, data_range: float = 1.0) -> jax.Array:
  """Per-image peak signal-to-noise ratio in dB, 10·log10(range² / MSE); [N, H, W, C] → [N] ([H, W, C] → []).

  Identical images give +inf, as scikit-image's `peak_signal_noise_ratio` does.
  """
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  if a.shape != b.shape:
    raise ValueError(f"psnr needs images of one shape, got {a.shape} and {b.shape}")
  mse = jnp.mean(jnp.square(a - b), axis=tuple(range(a.ndim - 3, a.ndim)))
  return 10.0 * (2 * math.log10(data_range) - jnp.log10(mse))


def signed_to_unit(images: jax.Array) -> jax.Array:
  """Model-space images in [-1, 1] → [0, 1], clipped: what a viewer (and a PNG) would show."""
  return jnp.clip((jnp.asarray(images, jnp.float32) + 1.0) * 0.5, 0.0, 1.0)


# The colour photos scikit-image ships inside its wheel (others, e.g. 'eagle', need a download). None is in any
# training set here, so reconstructing them measures how far an autoencoder generalises beyond its data.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")


def reference_photos(names=SKIMAGE_PHOTOS, size: int = 32, channels: int = 3, crops: int = 5) -> np.ndarray:
  """float32 [len(names)·crops, size, size, channels] in [-1, 1]: square crops of scikit-image photos, resized.

  Crop 0 is the largest centred square; crops 1-4 are its four quadrants, so small image sizes still see some
  texture instead of only the whole scene shrunk to a thumbnail.
  """
  try:
    from skimage import data as skdata
  except ImportError:
    raise ImportError("held-out photo metrics need scikit-image (pip install scikit-image)") from None
  from PIL import Image
  if not 1 <= crops <= 5:
    raise ValueError(f"crops must be between 1 and 5, got {crops}")
  out = []
  for name in names:
    loader = getattr(skdata, name, None)
    if loader is None:
      raise ValueError(f"skimage.data has no image {name!r}; bundled colour photos: {', '.join(SKIMAGE_PHOTOS)}")
    image = np.asarray(loader())
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, axis=-1)
    image = image[..., :3]
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top:top + side, left:left + side]
    half = side // 2
    boxes = [(0, 0, side)] + [(r * half, c * half, half) for r in (0, 1) for c in (0, 1)]
    for r, c, s in boxes[:crops]:
      pil = Image.fromarray(np.ascontiguousarray(square[r:r + s, c:c + s]).astype(np.uint8))
      pil = pil.convert("L" if channels == 1 else "RGB").resize((size, size), Image.Resampling.LANCZOS)
      arr = np.asarray(pil, np.float32).reshape(size, size, channels)
      out.append(arr / 127.5 - 1.0)
  return np.stack(out)
