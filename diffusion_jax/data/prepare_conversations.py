"""Writes the bundled image sets as LLaVA-format conversation data: PNG files and one .jsonl per split.

  python -m diffusion_jax.data.prepare_conversations mnist OUT [--kind digit_vqa] [--limit N]
  python -m diffusion_jax.data.prepare_conversations emoji OUT --kind captions

OUT/{split}.jsonl holds {"image": "images/{split}/00042.png", "label": 7, "conversations": [...]} per image, with
the conversations `data.instructions` makes (training phrasings for training splits, held-out phrasings for the eval
split), each drawn from a generator seeded by the record's index. Train on them with
`--config.data.source=conversations --config.data.path=OUT/{split}.jsonl --config.data.conversations=''`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm

from diffusion_jax.data import instructions, mnist
from diffusion_jax.data.pipeline import default_data_config
from diffusion_jax.data.records import DataError
from diffusion_jax.data.sources import make_source

SETS = {"mnist": ("train", "test"), "emoji": ("train", "test")}


def write_split(data_cfg, split: str, out: str, kind: str, *, heldout: bool, limit: int = 0, seed: int = 0) -> int:
  """Writes OUT/images/{split}/*.png and OUT/{split}.jsonl; returns the number of records."""
  source = make_source(data_cfg, split)
  n = min(len(source), limit) if limit else len(source)
  make = instructions.MakeConversation(kind, data_cfg.caption_templates, data_cfg.class_names, heldout=heldout)
  os.makedirs(os.path.join(out, "images", split), exist_ok=True)
  with open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
    for i in tqdm(range(n), desc=f"{split}", unit="image", leave=False):
      record = source[i]
      rel = os.path.join("images", split, f"{i:05d}.png")
      pixels = np.asarray(record["image"], np.uint8)
      Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels).save(
          os.path.join(out, rel))
      turns = make(record, np.random.default_rng([seed, i]))["conversations"]
      f.write(json.dumps({"image": rel, "label": int(record["label"]), "conversations": turns}) + "\n")
  return n


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("dataset", choices=sorted(SETS))
  parser.add_argument("out")
  parser.add_argument("--kind", choices=instructions.KINDS, default="digit_vqa")
  parser.add_argument("--limit", type=int, default=0, help="at most this many images per split (0: all)")
  args = parser.parse_args(argv)
  data = default_data_config()
  if args.dataset == "mnist":
    data.update(caption_templates=instructions.DIGIT_CAPTIONS, class_names=tuple(mnist.CLASS_NAMES))
  else:
    data.update(source="emoji", channels=3)
    if args.kind != "captions":
      parser.error("the emoji have captions only: use --kind captions")
  train, test = SETS[args.dataset]
  try:
    for split, heldout in ((train, False), (test, True)):
      n = write_split(data, split, args.out, args.kind, heldout=heldout, limit=args.limit)
      print(f"{os.path.join(args.out, split + '.jsonl')}: {n} records")
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
