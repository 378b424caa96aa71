"""Host-side conversion of pipeline inputs and outputs, with diffusers' `VaeImageProcessor` conventions.

Images come in as uint8 [0, 255] or float [0, 1] arrays (or PIL images), NHWC or HWC, and go to the VAE as float32
NHWC in [-1, 1]. Masks are white (>= 0.5) where the image is to be repainted and are binarised, as diffusers'
mask processor does. Outputs leave as float [0, 1], or as uint8 through
`to_uint8(images, value_range=(0, 1))`, rounded like diffusers' `numpy_to_pil`.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def _as_array(x: Any) -> np.ndarray:
  # PIL images convert through np.asarray too (to [H, W, 3] or, for mode 'L', [H, W]).
  if isinstance(x, (list, tuple)):
    return np.stack([np.asarray(v) for v in x])
  return np.asarray(x)


def _unit_range(x: np.ndarray, what: str) -> np.ndarray:
  if x.dtype == np.uint8:
    return x.astype(np.float32) / 255.0
  if x.dtype == np.bool_:
    return x.astype(np.float32)
  x = x.astype(np.float32)
  if x.size and (x.min() < 0.0 or x.max() > 1.0):
    raise ValueError(f'{what} must be uint8 or float in [0, 1]; got values in [{x.min():.3g}, {x.max():.3g}]')
  return x


def _batch(x: np.ndarray, batch: int, what: str) -> np.ndarray:
  if x.shape[0] == batch:
    return x
  if x.shape[0] == 1:
    return np.repeat(x, batch, axis=0)
  raise ValueError(f'{what} has batch {x.shape[0]}; expected 1 or the number of prompts ({batch})')


def check_size(height: int, width: int, factor: int) -> None:
  if height % factor or width % factor:
    raise ValueError(f'height and width must be multiples of {factor} (the VAE downsampling); got {height}x{width}')


def image_input(image: Any, batch: int) -> np.ndarray:
  """An RGB image or batch -> float32 [batch, H, W, 3] in [-1, 1]."""
  x = _as_array(image)
  if x.ndim == 3:
    x = x[None]
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f'image must be [H, W, 3] or [B, H, W, 3] (RGB, NHWC); got shape {x.shape}')
  return _batch(_unit_range(x, 'image') * 2.0 - 1.0, batch, 'image')


def mask_input(mask: Any, batch: int, size: tuple[int, int]) -> np.ndarray:
  """A mask or batch of masks -> float32 [batch, H, W, 1] of 0 (keep) and 1 (repaint)."""
  m = _as_array(mask)
  if m.ndim == 4 and m.shape[-1] == 1:
    m = m[..., 0]
  elif m.ndim == 3 and m.shape[-1] == 1 and m.shape[:2] == tuple(size):
    m = m[..., 0]
  if m.ndim == 2:
    m = m[None]
  if m.ndim != 3:
    raise ValueError(f'mask must be [H, W], [B, H, W] or [B, H, W, 1]; got shape {np.shape(mask)}')
  if m.shape[1:] != tuple(size):
    raise ValueError(f'mask is {m.shape[1]}x{m.shape[2]} but the image is {size[0]}x{size[1]}')
  m = (_unit_range(m, 'mask') >= 0.5).astype(np.float32)
  return _batch(m, batch, 'mask')[..., None]


def to_uint8(images, *, value_range: tuple[float, float]) -> np.ndarray:
  """Maps float images in `value_range` ((-1, 1) for our models, (0, 1) for decoded pipeline outputs) to uint8
  [0, 255], the layout PNG and PIL expect; the range is explicit because a wrong guess silently halves contrast.

  Values round to nearest (half to even), like diffusers' `numpy_to_pil`. Out-of-range values are clipped rather
  than wrapped: samplers overshoot slightly and a wrapped pixel would turn a bright stroke black. uint8 input is
  returned unchanged so callers need not track which form they hold.
  """
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  if not np.issubdtype(images.dtype, np.floating):
    raise TypeError(f"expected float images in {value_range} or uint8, got dtype {images.dtype}")
  low, high = value_range
  # float32 stays float32, so (0, 1) outputs match diffusers' `(images * 255).round()` bit for bit; float16 is
  # widened first, or its rounding would shift levels. With (-1, 1), 0 maps to 127.5 and rounds to 128.
  x = images if images.dtype.itemsize >= 4 else images.astype(np.float32)
  scaled = (x - x.dtype.type(low)) * x.dtype.type(255.0 / (high - low))
  return np.clip(np.round(scaled), 0, 255).astype(np.uint8)
