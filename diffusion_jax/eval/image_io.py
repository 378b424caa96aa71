"""Writing generated images to disk so people and scripts can inspect them.

Samples are stored as one PNG per image plus an `index.jsonl` that ties each file to its prompt (and whatever
the caller measured about it, e.g. the label a digit classifier predicted), so a run's outputs can be audited
without re-running the model. A `grid.png` gives the at-a-glance view.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from diffusion_jax.pipelines.images import to_uint8

# Separators are white: most samples here are light digits on a dark background, so white lines keep tiles apart.
GRID_PAD_VALUE = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # the image files a folder of images is read for
_INDEX_KEYS = ("file", "prompt", "index")


def image_files(folder: str) -> list[str]:
  """The names of `folder`'s image files (`IMAGE_SUFFIXES`, any case), sorted."""
  return sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))


def _as_nhwc(images: np.ndarray) -> np.ndarray:
  if images.ndim == 3:  # [N, H, W] grayscale, e.g. straight from load_mnist.
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"expected images [N, H, W, C] with C in (1, 3), got shape {images.shape}")
  return images


def make_grid(images_uint8, cols: int | None = None, pad: int = 2) -> np.ndarray:
  """Tiles N images into one uint8 [H, W, C] picture, row-major, `pad` white pixels around every tile.

  With R = ceil(N / cols) rows the result is [R * (h + pad) + pad, cols * (w + pad) + pad, C]; unused cells in
  the last row stay white. `cols` defaults to ceil(sqrt(N)) for a roughly square grid.
  """
  images = _as_nhwc(to_uint8(images_uint8, value_range=(-1.0, 1.0)))
  n, h, w, c = images.shape
  if n == 0:
    raise ValueError("make_grid needs at least one image")
  if pad < 0:
    raise ValueError(f"pad must be >= 0, got {pad}")
  cols = math.ceil(math.sqrt(n)) if cols is None else int(cols)
  if cols < 1:
    raise ValueError(f"cols must be >= 1, got {cols}")
  cols = min(cols, n)  # wider than N would only add empty white columns
  rows = math.ceil(n / cols)
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), GRID_PAD_VALUE, np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    top, left = pad + r * (h + pad), pad + q * (w + pad)
    grid[top:top + h, left:left + w] = images[i]
  return grid


def _to_png(image_hwc: np.ndarray) -> Image.Image:
  # Grayscale goes out as mode 'L' so a reader gets back exactly one channel, not three copies of it.
  if image_hwc.shape[-1] == 1:
    return Image.fromarray(np.ascontiguousarray(image_hwc[..., 0]))
  return Image.fromarray(np.ascontiguousarray(image_hwc))


def _jsonable(value: Any) -> Any:
  """numpy/jax scalars and arrays (labels, scores) become plain Python so json.dumps accepts them."""
  if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
    return value.tolist()
  return value


def new_sample_dir(parent: str, name: str) -> str:
  """Creates and returns a folder no other sampling invocation has written: `parent/name`, else `parent/name_2`,
  `parent/name_3`, ...

  `os.mkdir` either creates the folder or fails because it exists, atomically, so two processes sampling the same
  run at once (a `--mode sample` beside the training run's own sampling) can never be handed the same folder. Only
  the process that writes the images (process 0) should call it.
  """
  os.makedirs(parent, exist_ok=True)
  for n in itertools.count(1):
    path = os.path.join(parent, name if n == 1 else f"{name}_{n}")
    try:
      os.mkdir(path)
      return path
    except FileExistsError:
      continue


def _create(path: str):
  # 'x': never replace a file another invocation wrote, even one that raced us into the folder.
  return open(path, "xb")


def save_samples(out_dir: str, images, prompts: Sequence[str], *, grid_cols: int | None = None,
                 extra: Sequence[Mapping[str, Any]] | None = None) -> dict:
  """Writes `{i:05d}.png` per image, `index.jsonl` (file, prompt, index, then extra[i]) and `grid.png` into
  `out_dir`, which must be empty or not exist yet (see `new_sample_dir`): the index then describes exactly the
  files of its folder.

  `images` are float [-1, 1] or uint8, [N, H, W, C] with C in (1, 3). Returns {'files': [png paths in order],
  'grid': path, 'index': path, 'grid_image': the grid as uint8 [H, W, C]}.
  """
  images = _as_nhwc(to_uint8(images, value_range=(-1.0, 1.0)))
  n = images.shape[0]
  if n == 0:
    raise ValueError("save_samples got no images")
  prompts = list(prompts)
  if len(prompts) != n:
    raise ValueError(f"got {n} images but {len(prompts)} prompts; need one prompt per image")
  if extra is not None:
    extra = list(extra)
    if len(extra) != n:
      raise ValueError(f"got {n} images but {len(extra)} extra records; need one per image")
    for i, fields in enumerate(extra):
      clash = sorted(set(fields) & set(_INDEX_KEYS))
      if clash:
        raise ValueError(f"extra[{i}] uses reserved index.jsonl keys {clash}")

  os.makedirs(out_dir, exist_ok=True)
  if os.listdir(out_dir):
    raise FileExistsError(f"{out_dir} already holds files; samples go to a new folder (new_sample_dir)")
  files, lines = [], []
  for i in range(n):
    name = f"{i:05d}.png"
    path = os.path.join(out_dir, name)
    with _create(path) as f:
      _to_png(images[i]).save(f, format="PNG")
    files.append(path)
    record = {"file": name, "prompt": str(prompts[i]), "index": i}
    if extra is not None:
      record.update({str(k): _jsonable(v) for k, v in extra[i].items()})
    lines.append(json.dumps(record))

  grid = make_grid(images, cols=grid_cols)
  grid_path = os.path.join(out_dir, "grid.png")
  with _create(grid_path) as f:
    _to_png(grid).save(f, format="PNG")
  # The index last: a folder with an index.jsonl is complete.
  index_path = os.path.join(out_dir, "index.jsonl")
  with _create(index_path) as f:
    f.write("".join(line + "\n" for line in lines).encode())
  return {"files": files, "grid": grid_path, "index": index_path, "grid_image": grid}
