"""Per-example grain transforms from a raw source example to model inputs.

Each is a module-level class, because grain spawns its worker processes and pickles the pipeline into them.
A record that cannot be used flows through every step as `image=None` / empty text and comes out with
`valid=0`, an all-zero image and zero tokens: shapes stay static and nothing raises inside a worker.
Random steps are `RandomMap`s, whose generator grain derives from the seed and the element's index, so a
resumed run draws exactly what an uninterrupted one would have.
"""
from __future__ import annotations

import io
from collections.abc import Sequence

import grain
import numpy as np
from PIL import Image

from diffusion_jax.data.records import NO_LABEL

# Square images at most this many pixels smaller than the target are zero-padded rather than resized: the
# usual 28 -> 32 MNIST convention, which keeps the strokes sharp instead of resampling them.
_MAX_PAD = 4


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
  if img.mode in ("RGBA", "LA", "P", "PA"):
    # Transparent pixels carry arbitrary colours; composite on white as a viewer would show them.
    rgba = img.convert("RGBA")
    img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    img.alpha_composite(rgba)
  return img.convert("L" if channels == 1 else "RGB")


def _as_hwc(img: Image.Image) -> np.ndarray:
  pixels = np.asarray(img, np.uint8)
  return pixels[..., None] if pixels.ndim == 2 else pixels


class DecodeImage(grain.transforms.Map):
  """Encoded bytes or any uint8 array -> uint8 [H, W, channels]; undecodable -> None."""

  def __init__(self, channels: int):
    if channels not in (1, 3):
      raise ValueError(f"channels must be 1 or 3, got {channels}")
    self.channels = channels

  def map(self, element: dict) -> dict:
    image = element["image"]
    try:
      if image is None:
        pass
      elif isinstance(image, (bytes, bytearray)):
        with Image.open(io.BytesIO(image)) as img:
          img.load()  # open() only reads the header; truncated data fails here
          image = _as_hwc(_to_mode(img, self.channels))
      else:
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[-1] == 1:
          image = image[..., 0]
        image = _as_hwc(_to_mode(Image.fromarray(image.astype(np.uint8, copy=False)), self.channels))
    except Exception:  # pylint: disable=broad-except
      # Any failure here is a property of this one record (PIL raises OSError, SyntaxError, ValueError,
      # DecompressionBombError...), so it marks the record invalid instead of ending the run.
      image = None
    return {**element, "image": image}


class FitImage(grain.transforms.Map):
  """uint8 [H, W, C] -> [size, size, C]: zero-pad nearly-fitting squares, else resize shorter side and crop."""

  def __init__(self, size: int):
    if size <= 0:
      raise ValueError(f"image_size must be positive, got {size}")
    self.size = size

  def map(self, element: dict) -> dict:
    image = element["image"]
    if image is None:
      return element
    h, w, c = image.shape
    s = self.size
    if (h, w) == (s, s):
      return element
    if h == w and 0 < s - h <= _MAX_PAD:
      top = (s - h) // 2
      out = np.zeros((s, s, c), np.uint8)
      out[top : top + h, top : top + w] = image
      return {**element, "image": out}
    scale = s / min(h, w)
    nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
    img = Image.fromarray(image[..., 0] if c == 1 else image)
    # PIL widens the bicubic kernel when shrinking, i.e. it antialiases; plain decimation would alias.
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    top, left = (nh - s) // 2, (nw - s) // 2
    img = img.crop((left, top, left + s, top + s))
    return {**element, "image": _as_hwc(img)}


class RandomFlip(grain.transforms.RandomMap):
  """Horizontal flip with probability 1/2 (only for data where left/right carries no meaning)."""

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    flip = rng.random() < 0.5  # drawn even for invalid records so every index consumes the same draws
    if element["image"] is None or not flip:
      return element
    return {**element, "image": np.ascontiguousarray(element["image"][:, ::-1])}


class ChooseCaption(grain.transforms.RandomMap):
  """Sets 'text': the record's caption, else a template filled with its class name, else '' (invalid).

  With `randomize` (training) the template is drawn at random; otherwise the first template is used so that
  evaluation prompts are fixed.
  """

  def __init__(self, templates: Sequence[str], class_names: Sequence[str], randomize: bool):
    if not templates:
      raise ValueError("caption_templates is empty")
    self.templates = tuple(templates)
    self.class_names = tuple(class_names)
    self.randomize = randomize

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    pick = int(rng.integers(len(self.templates))) if self.randomize else 0
    text = element.get("caption") or ""
    label = int(element.get("label", NO_LABEL))
    if not text and label >= 0:
      text = fill_template(self.templates[pick], label, self.class_names)
    return {**element, "text": text}


def fill_template(template: str, label: int, class_names: Sequence[str]) -> str:
  # A label past the names list still gets a caption (its number) rather than failing the record.
  name = class_names[label] if 0 <= label < len(class_names) else str(label)
  return template.format(name=name, label=label)


class Tokenize(grain.transforms.Map):
  """'text' -> int32 'tokens' [length]; an empty text gets all-pad tokens."""

  def __init__(self, tokenizer, length: int):
    self.tokenizer = tokenizer
    self.length = length

  def map(self, element: dict) -> dict:
    if element["text"]:
      tokens = self.tokenizer([element["text"]], self.length)[0]
    else:
      tokens = np.full((self.length,), self.tokenizer.pad_id, np.int32)
    return {**element, "tokens": tokens.astype(np.int32, copy=False)}


class ToModelInputs(grain.transforms.Map):
  """Final example: float32 image in [-1, 1], int32 tokens and label, float32 valid; strings dropped."""

  def __init__(self, size: int, channels: int, length: int):
    self.shape = (size, size, channels)
    self.length = length

  def map(self, element: dict) -> dict:
    image = element["image"]
    valid = image is not None and bool(element["text"])
    if valid:
      pixels = image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
      tokens = element["tokens"]
    else:
      pixels = np.zeros(self.shape, np.float32)
      tokens = np.zeros((self.length,), np.int32)
    return {
        "image": pixels,
        "tokens": tokens,
        "label": np.asarray(element["label"], np.int32),
        "valid": np.asarray(valid, np.float32),
    }


class CopyToNumpy(grain.transforms.Map):
  """Copies worker output out of shared memory into plain numpy arrays.

  mp_prefetch hands out `SharedMemoryArray`s whose segment is freed only when the last view dies; a plain copy
  (cheap next to a training step) keeps that lifetime out of the trainer's hands.
  """

  def map(self, batch: dict) -> dict:
    return {k: np.array(v) for k, v in batch.items()}
