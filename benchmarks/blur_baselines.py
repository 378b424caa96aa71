"""Reference points for the `fid` evaluator's source='heldout' numbers: the held-out images against bicubic round trips
of themselves through smaller sizes, in the feature space the README's table uses, so a reconstruction's or an
upsampling's distance reads against known blur (paired KID, as the evaluator computes it).

  python -m benchmarks.blur_baselines --data mnist                      # 512 test digits, the digit judge's features
  python -m benchmarks.blur_baselines --data emoji --clip /tmp/emoji_clip [--size 64]
                                                                        # 122 held-out emoji, that CLIP's image space

MNIST: 28 px through 14 and 7 px, Fréchet distance and KID (subsets of 256); emoji: through 1/2, 1/4 and 1/8 of
`--size`, KID (subsets of 61) and precision/recall (122 images are too few for a Fréchet distance on 128-d features).
"""
from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

from diffusion_jax.eval import fid
from diffusion_jax.models.conditioners import downsample, upsample_bicubic


def round_trip(x: np.ndarray, low: int) -> np.ndarray:
  return np.clip(np.asarray(upsample_bicubic(downsample(jnp.asarray(x), low), x.shape[1])), -1, 1)


def mnist(args):
  from diffusion_jax.data.mnist import load_mnist
  from diffusion_jax.eval import digit_classifier
  images, _ = load_mnist("test")
  x = digit_classifier.mnist_as_model_input(images[:args.count])
  judge = digit_classifier.load_or_train()
  features = lambda im: judge.features(np.asarray(im)).astype(np.float64)
  real = features(x)
  for low in (14, 7):
    got = fid.scores(real, features(round_trip(x, low)), kid_subset_size=len(x) // 2, paired=True)
    print(f"bicubic through {low} px ({len(x)} test digits): Fréchet {got['fid']:.2f}, "
          f"kid {got['kid']:.3f} ± {got['kid_std']:.3f}")


def emoji(args):
  from configs.emoji_vae import get_config
  from diffusion_jax.data import emoji as emoji_data
  from diffusion_jax.evaluators.clip_scorer import ClipScorer
  c = get_config()
  c.data.image_size = args.size
  images, _, _ = emoji_data.load_split(c.data, c.data.eval_split)
  x = images.astype(np.float32) / 127.5 - 1
  clip = ClipScorer(args.clip, "--clip")
  features = clip.kid_features
  real = features(x)
  for factor in (2, 4, 8):
    blurred = features(round_trip(x, args.size // factor))
    k, s = fid.kid(real, blurred, subset_size=len(x) // 2, paired=True)
    p, r = fid.precision_recall(real, blurred)
    print(f"bicubic through {args.size // factor} px: kid {k:.4f} ± {s:.4f}, precision {p:.3f}, recall {r:.3f}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", choices=("mnist", "emoji"), required=True)
  parser.add_argument("--clip", default="", help="an emoji_clip run (emoji)")
  parser.add_argument("--size", type=int, default=32, help="the emoji's side (64 for the upsampler)")
  parser.add_argument("--count", type=int, default=512, help="test digits (mnist)")
  args = parser.parse_args(argv)
  if args.data == "emoji" and not args.clip:
    parser.error("--data emoji needs --clip (a finished emoji_clip run)")
  (mnist if args.data == "mnist" else emoji)(args)


if __name__ == "__main__":
  main()
