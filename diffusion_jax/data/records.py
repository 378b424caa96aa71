"""The ArrayRecord record format shared by `prepare.py` (writer) and the 'array_record' source (reader).

One record is a msgpack map `{'image': PNG/JPEG bytes, 'caption': str, 'label': int}`. msgpack rather than
pickle because records come from files a user may have downloaded: decoding them must never run code. Images
stay encoded so a dataset of photos is as small on disk as its JPEGs.
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterable

import msgpack  # a dependency of flax, so always present
import numpy as np
from PIL import Image

NO_LABEL = -1
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


class DataError(ValueError):
  """A dataset that cannot be used at all: missing, empty or misconfigured.

  A single bad record is not a DataError for the pipeline: it becomes an example with valid=0, so one broken file
  cannot stop a long run.
  """


class CorruptRecordError(DataError):
  """One record's bytes are not a record of this format."""


def is_png_or_jpeg(data: bytes) -> bool:
  return data.startswith(_PNG_MAGIC) or data.startswith(_JPEG_MAGIC)


def encode_png(pixels: np.ndarray) -> bytes:
  """PNG bytes of a uint8 [H, W], [H, W, 1] or [H, W, 3|4] array (lossless, so pixels round-trip exactly)."""
  pixels = np.asarray(pixels)
  if pixels.dtype != np.uint8:
    raise ValueError(f"expected uint8 pixels, got {pixels.dtype}")
  if pixels.ndim == 3 and pixels.shape[-1] == 1:
    pixels = pixels[..., 0]
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def encode_record(image: bytes | np.ndarray, caption: str = "", label: int = NO_LABEL) -> bytes:
  """Serialises one example; `image` is PNG/JPEG bytes (kept as they are) or a uint8 array (stored as PNG)."""
  if isinstance(image, (bytes, bytearray)):
    image = bytes(image)
    if not is_png_or_jpeg(image):
      raise ValueError("record images must be PNG or JPEG bytes; pass other formats as a uint8 array")
  else:
    image = encode_png(image)
  if not isinstance(caption, str):
    raise TypeError(f"caption must be a str, got {type(caption).__name__}")
  return msgpack.packb({"image": image, "caption": caption, "label": int(label)}, use_bin_type=True)


def decode_record(data: bytes) -> dict:
  """Inverse of `encode_record`: {'image': bytes, 'caption': str, 'label': int}; the image stays encoded."""
  try:
    obj = msgpack.unpackb(data, raw=False)
  except (ValueError, msgpack.UnpackException) as e:
    raise CorruptRecordError(f"record is not valid msgpack: {e}") from e
  if not isinstance(obj, dict) or not isinstance(obj.get("image"), bytes):
    raise CorruptRecordError("record is not a map with an 'image' bytes field")
  caption = obj.get("caption", "")
  label = obj.get("label", NO_LABEL)
  if not isinstance(caption, str) or not isinstance(label, int) or isinstance(label, bool):
    raise CorruptRecordError("record has a caption that is not a str or a label that is not an int")
  return {"image": obj["image"], "caption": caption, "label": label}


def write_array_record(path: str, records: Iterable[bytes]) -> int:
  """Writes serialised records to one ArrayRecord file and returns how many were written."""
  # Imported here so reading code paths that never write do not need the writer's extension loaded.
  from array_record.python.array_record_module import ArrayRecordWriter

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # group_size:1 keeps every record separately addressable: the pipeline reads in shuffled order, and larger
  # groups would decompress a whole group to fetch one record.
  writer = ArrayRecordWriter(path, "group_size:1")
  count = 0
  try:
    for record in records:
      writer.write(record)
      count += 1
  finally:
    writer.close()
  return count
