"""Converts a dataset to one ArrayRecord file in the records.py format, for `data.source='array_record'`.

  python -m diffusion_jax.data.prepare --source mnist --split train --output /tmp/x/mnist_train.array_record
  python -m diffusion_jax.data.prepare --source image_folder --input DIR --output FILE
  python -m diffusion_jax.data.prepare --source tfds --tfds_name mnist --input DATA_DIR --output FILE
  python -m diffusion_jax.data.prepare --source emoji --split test --image_size 32 --output FILE [--input FONT]

Corrupt images and records with neither caption nor label are left out and counted, so the training
pipeline reads only usable records. PNG/JPEG files are copied byte for byte; other formats and decoded
arrays are stored as PNG. `{split}` in --output is replaced by --split.
"""
from __future__ import annotations

import argparse
import io
import sys

import numpy as np
from PIL import Image

from diffusion_jax.data import records, sources


class _Parser(argparse.ArgumentParser):
  """argparse, but a bad argument is one line on stderr (no usage block) and exit status 2."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m diffusion_jax.data.prepare", description=__doc__.splitlines()[0])
  p.add_argument("--source", required=True, choices=("mnist", "image_folder", "tfds", "emoji"))
  p.add_argument("--output", required=True, help="ArrayRecord file to write; {split} is filled in")
  p.add_argument("--split", default="train")
  p.add_argument("--input", default="", help="image folder, TFDS data_dir, or emoji font (default: Noto Color Emoji)")
  p.add_argument("--tfds_name", default="")
  p.add_argument("--caption_key", default="", help="TFDS text feature holding the caption")
  p.add_argument("--image_size", type=int, default=32, help="emoji only: side of the rendered square images")
  p.add_argument("--limit", type=int, default=0, help="convert at most this many records (0: all)")
  return p


def _usable_image(image) -> bytes | None:
  """The bytes to store for a raw example's image, or None if it does not decode."""
  if image is None:
    return None
  if isinstance(image, (bytes, bytearray)):
    try:
      with Image.open(io.BytesIO(image)) as img:
        img.load()
        if records.is_png_or_jpeg(bytes(image)):
          return bytes(image)
        if img.mode not in ("L", "RGB", "RGBA"):
          img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
        return records.encode_png(np.asarray(img))
    except Exception:  # pylint: disable=broad-except
      return None  # any decode failure is this file's fault: count it, keep converting
  return records.encode_png(np.asarray(image, np.uint8))


def convert(source, output: str, limit: int = 0) -> dict:
  """Writes `source`'s usable examples to `output`; returns counts {'written', 'corrupt', 'unlabelled'}."""
  counts = {"written": 0, "corrupt": 0, "unlabelled": 0}

  def usable_records():
    n = len(source) if not limit else min(limit, len(source))
    for i in range(n):
      example = source[i]
      if not example["caption"] and example["label"] < 0:
        counts["unlabelled"] += 1
        continue
      image = _usable_image(example["image"])
      if image is None:
        counts["corrupt"] += 1
        continue
      yield records.encode_record(image, example["caption"], example["label"])

  counts["written"] = records.write_array_record(output, usable_records())
  return counts


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if args.limit < 0:
    parser.error("--limit must be >= 0")
  if args.image_size <= 0:
    parser.error("--image_size must be positive")
  try:
    if args.source == "mnist":
      source = sources.MnistSource(args.split)
    elif args.source == "image_folder":
      if not args.input:
        parser.error("--source image_folder needs --input DIR")
      source = sources.ImageFolderSource(args.input, args.split)
    elif args.source == "emoji":
      # The default config's split names, so the files pair with data.train_split/eval_split left as they are.
      data_cfg = dict(path=args.input, image_size=args.image_size, train_split="train", eval_split="test")
      source = sources.EmojiSource(data_cfg, args.split)
    else:
      if not args.tfds_name:
        parser.error("--source tfds needs --tfds_name")
      source = sources.TfdsSource(args.tfds_name, args.split, args.input, args.caption_key)
  except records.DataError as e:
    parser.error(str(e))
  output = args.output.replace("{split}", args.split)
  counts = convert(source, output, args.limit)
  print(
      f"wrote {counts['written']} records to {output}; skipped {counts['corrupt']} corrupt and "
      f"{counts['unlabelled']} with neither caption nor label"
  )
  # An output with no usable record cannot train anything: fail so scripts notice.
  return 0 if counts["written"] else 1


if __name__ == "__main__":
  sys.exit(main())
