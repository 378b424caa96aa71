"""Colour emoji with their Unicode names: a small image–caption dataset that needs no download.

Debian's `fonts-noto-color-emoji` package holds ~1,400 single-codepoint emoji as colour bitmaps, and
`unicodedata.name` gives each a caption ("cyclone", "closed umbrella"). That makes a real text-to-image and
retrieval set that fits in a few MB and is rendered offline in about a second.

Rendering is cached as an .npz under `$DIFFUSION_JAX_CACHE` (default `~/.cache/diffusion_jax`), one file per image
size, so later loads (and grain worker processes) only read it. The file records which font and which Unicode
database made it; a different font or Python's newer Unicode names re-render it.

The split is by a hash of the codepoint, not by position: an emoji stays in the same split whatever the font
version or Python's Unicode version adds or drops around it. Labels are positions in the whole set (codepoint
order), so every emoji is its own class for retrieval evaluation.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
import unicodedata
import zlib

import numpy as np
from absl import logging
from PIL import Image, ImageDraw, ImageFont

from diffusion_jax.data.records import DataError

APT_PACKAGE = "fonts-noto-color-emoji"
# Where Linux distributions install Noto Color Emoji (Debian/Ubuntu, Fedora, Arch and others).
DEFAULT_FONT_PATHS = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/google-noto-color-emoji/NotoColorEmoji.ttf",
    "/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf",
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/truetype/NotoColorEmoji.ttf",
)
# CBDT bitmap fonts hold a single strike; FreeType refuses any other size for Noto Color Emoji.
BITMAP_SIZE = 109
TEST_FRACTION_DENOMINATOR = 10  # the test split is the emoji whose codepoint hash is 0 mod 10: about 10%
# Bumped when the rendering changes, so caches written by older code are not reused.
_FORMAT_VERSION = 1
# Emoji live in the Basic Multilingual and Supplementary Multilingual planes.
_LAST_CODEPOINT = 0x1FFFF
_NOT_CHARACTERS = ("Cc", "Cn", "Co", "Cs")


@dataclasses.dataclass(frozen=True)
class EmojiSet:
  """Every renderable emoji in codepoint order; an emoji's label is its index here."""

  images: np.ndarray  # uint8 [N, S, S, 3], on white
  captions: list[str]  # unicodedata.name, lower case
  codepoints: np.ndarray  # int32 [N], increasing

  def __len__(self) -> int:
    return len(self.captions)


def find_font(path: str = "") -> str:
  """`path` if given, else the first installed Noto Color Emoji; a DataError says how to get one."""
  if path:
    if not os.path.isfile(path):
      raise DataError(
          f"emoji font {path!r} (data.path) does not exist: point data.path at a colour emoji .ttf such as "
          f"NotoColorEmoji.ttf, or leave it empty after `apt-get install {APT_PACKAGE}`"
      )
    return path
  for candidate in DEFAULT_FONT_PATHS:
    if os.path.isfile(candidate):
      return candidate
  raise DataError(
      f"no colour emoji font found: `apt-get install {APT_PACKAGE}`, or set data.path to a colour emoji .ttf "
      f"(looked in {', '.join(DEFAULT_FONT_PATHS)})"
  )


def default_cache_dir() -> str:
  return os.environ.get("DIFFUSION_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "diffusion_jax")


def is_test(codepoint: int) -> bool:
  """Whether an emoji belongs to the test split (a fixed ~10%, decided by its codepoint alone)."""
  return zlib.crc32(int(codepoint).to_bytes(4, "little")) % TEST_FRACTION_DENOMINATOR == 0


def _load_font(font_path: str) -> ImageFont.FreeTypeFont:
  try:
    # BASIC layout: a single codepoint needs no shaping, and raqm fails outright on some lone combining marks.
    return ImageFont.truetype(font_path, BITMAP_SIZE, layout_engine=ImageFont.Layout.BASIC)
  except OSError as e:
    raise DataError(
        f"cannot load {font_path!r} as a colour bitmap emoji font at size {BITMAP_SIZE} ({e}); "
        f"use NotoColorEmoji.ttf from `apt-get install {APT_PACKAGE}`"
    ) from e


def _render_one(font: ImageFont.FreeTypeFont, ch: str, size: int) -> np.ndarray | None:
  """uint8 [size, size, 3] of `ch` centred on white, or None when the font draws nothing for it."""
  left, top, right, bottom = font.getbbox(ch)
  if right <= left or bottom <= top:
    return None  # a cheap first test: most codepoints have no glyph at all
  # Noto's cell is 136x128; a square canvas around it keeps the whole glyph when resizing to a square.
  side = max(right - left, bottom - top)
  canvas = Image.new("RGBA", (side, side), (255, 255, 255, 0))
  offset = ((side - (right - left)) // 2 - left, (side - (bottom - top)) // 2 - top)
  ImageDraw.Draw(canvas).text(offset, ch, font=font, embedded_color=True)
  if canvas.getchannel("A").getbbox() is None:
    return None
  image = Image.new("RGBA", canvas.size, (255, 255, 255, 255))
  image.alpha_composite(canvas)
  # Compositing before resizing makes the edges blend towards white, as the alpha would; Lanczos shrinks
  # 136 -> 32 without the aliasing of nearest/bilinear.
  image = image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
  return np.asarray(image, np.uint8)


def render_emoji(font_path: str, size: int) -> EmojiSet:
  """Renders every named codepoint that `font_path` draws, at `size` x `size`, in codepoint order."""
  if size <= 0:
    raise DataError(f"emoji image size must be positive, got {size}")
  font = _load_font(font_path)
  images, captions, codepoints = [], [], []
  for cp in range(0x20, _LAST_CODEPOINT + 1):
    ch = chr(cp)
    if unicodedata.category(ch) in _NOT_CHARACTERS:
      continue
    name = unicodedata.name(ch, "")
    if not name:
      continue
    pixels = _render_one(font, ch, size)
    if pixels is not None:
      images.append(pixels)
      captions.append(name.lower())
      codepoints.append(cp)
  if not images:
    raise DataError(f"{font_path!r} draws no emoji: use a colour emoji font (`apt-get install {APT_PACKAGE}`)")
  return EmojiSet(np.stack(images), captions, np.asarray(codepoints, np.int32))


def _fingerprint(font_path: str, size: int) -> dict:
  stat = os.stat(font_path)
  return {
      "format": _FORMAT_VERSION,
      "font": os.path.realpath(font_path),
      "font_bytes": stat.st_size,
      "font_mtime_ns": stat.st_mtime_ns,
      "size": size,
      "unicode": unicodedata.unidata_version,
  }


def cache_path(size: int, cache_dir: str | None = None) -> str:
  return os.path.join(cache_dir or default_cache_dir(), f"emoji_{size}.npz")


def _read_cache(path: str, fingerprint: dict) -> EmojiSet | None:
  try:
    with np.load(path, allow_pickle=False) as f:
      if json.loads(str(f["meta"])) != fingerprint:
        logging.info("%s was rendered from another font or Unicode version: re-rendering", path)
        return None
      return EmojiSet(f["images"], [str(c) for c in f["captions"]], f["codepoints"])
  except FileNotFoundError:
    return None
  except (OSError, ValueError, KeyError) as e:
    logging.warning("cannot read emoji cache %s (%s): re-rendering", path, e)
    return None


def _write_cache(path: str, emoji: EmojiSet, fingerprint: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # Several processes may render at once: each writes its own temporary file and renames it into place, so a
  # reader sees a whole file or none.
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path), suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, images=emoji.images, captions=np.asarray(emoji.captions), codepoints=emoji.codepoints,
               meta=np.asarray(json.dumps(fingerprint, sort_keys=True)))
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared by several users' runs
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def load_emoji(font_path: str = "", size: int = 32, cache_dir: str | None = None) -> EmojiSet:
  """The whole emoji set at `size`, from the cache if it matches the font, else rendered and cached."""
  font_path = find_font(font_path)
  fingerprint = _fingerprint(font_path, size)
  path = cache_path(size, cache_dir)
  emoji = _read_cache(path, fingerprint)
  if emoji is not None:
    return emoji
  start = time.perf_counter()
  emoji = render_emoji(font_path, size)
  logging.info("rendered %d emoji at %dx%d from %s in %.1fs", len(emoji), size, size, font_path,
               time.perf_counter() - start)
  try:
    _write_cache(path, emoji, fingerprint)
  except OSError as e:  # a read-only home still gets its data, only slower next time
    logging.warning("cannot cache emoji at %s: %s", path, e)
  return emoji


def split_indices(codepoints: np.ndarray, split: str, train_split: str = "train", eval_split: str = "test"):
  """Indices (= labels) of the emoji in `split`: `eval_split` is the ~10% test part, `train_split` the rest."""
  if train_split == eval_split:
    raise DataError(f"data.train_split and data.eval_split are both {train_split!r}; the emoji set needs two names")
  if split not in (train_split, eval_split):
    raise DataError(f"the emoji set has no split {split!r}; expected {train_split!r} or {eval_split!r}")
  test = np.fromiter((is_test(cp) for cp in codepoints), bool, len(codepoints))
  return np.flatnonzero(test if split == eval_split else ~test).astype(np.int32)


def load_split(data_cfg, split: str, cache_dir: str | None = None) -> tuple[np.ndarray, list[str], np.ndarray]:
  """(images uint8 [N, S, S, 3], captions, labels int32 [N]) of `split`, S = data.image_size.

  Uses `data.path` (font; empty: the installed Noto Color Emoji), `data.train_split` and `data.eval_split`.
  Captions and labels come in the order the 'emoji' source serves them.
  """
  emoji = load_emoji(data_cfg.path, data_cfg.image_size, cache_dir)
  labels = split_indices(emoji.codepoints, split, data_cfg.train_split, data_cfg.eval_split)
  return emoji.images[labels], [emoji.captions[i] for i in labels], labels
