"""Writes this folder's five images: the outline of the Noto Color Emoji star (U+2B50, Debian's
fonts-noto-color-emoji) drawn as a 2-3 px stroke, each copy turned by up to 15°, scaled to 17-20 px and centred in
28 × 28 as MNIST centres its digits, white on black. They are the example concept of configs/mnist_concept.py: a
symbol the MNIST models never saw, in the hand of a digit.

  python diffusion_jax/assets/concept_star/make_star.py [--out DIR --count N --seed S]

(`--seed 1 --count 50` draws held-out stars of the same kind, to check a judge with.)
"""
import argparse
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"


def outline(char: str = "\u2b50") -> Image.Image:
  canvas = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
  ImageDraw.Draw(canvas).text((0, 0), char, font=ImageFont.truetype(FONT, 109), embedded_color=True)
  mask = np.asarray(canvas)[..., 3] > 128
  ys, xs = np.nonzero(mask)
  shape = Image.fromarray((mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1] * 255).astype(np.uint8))
  edge = Image.fromarray(((np.asarray(shape.filter(ImageFilter.FIND_EDGES)) > 0) * 255).astype(np.uint8))
  return edge.filter(ImageFilter.MaxFilter(9))  # a pen of about MNIST's stroke once shrunk


def draw(count: int, seed: int) -> list[np.ndarray]:
  rng, glyph, out = np.random.default_rng(seed), outline(), []
  for _ in range(count):
    turned = glyph.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR, expand=True)
    size = int(rng.uniform(17, 21))
    small = turned.resize((size, size), Image.LANCZOS)
    canvas = Image.new("L", (28, 28))
    canvas.paste(small, tuple(int(o) for o in (28 - size) // 2 + rng.integers(-1, 2, 2)))
    out.append(np.asarray(canvas))
  return out


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
  parser.add_argument("--count", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  for i, image in enumerate(draw(args.count, args.seed)):
    Image.fromarray(image).save(os.path.join(args.out, f"star_{i}.png"))
