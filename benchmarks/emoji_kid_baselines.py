"""Reference points for the emoji KID in an emoji CLIP's image space: the 122 held-out emoji against bicubic
round trips of themselves through 16, 8 and 4 px (paired KID, as the `fid` evaluator's source='heldout' computes
it, subsets of 61), so a model's KID can be read against known blur.

  python -m benchmarks.emoji_kid_baselines /tmp/emoji_clip [SIZE]   # SIZE: the images' side, 32 (64 for upsamplers)
"""
import sys

import jax.numpy as jnp
import numpy as np

from configs.emoji_vae import get_config
from diffusion_jax.contrastive.zero_shot import normalize
from diffusion_jax.data import emoji
from diffusion_jax.eval import fid
from diffusion_jax.evaluators.clip_scorer import ClipScorer
from diffusion_jax.models.conditioners import downsample, upsample_bicubic


def main(argv):
  size = int(argv[2]) if len(argv) > 2 else 32
  c = get_config()
  c.data.image_size = size
  images, _, _ = emoji.load_split(c.data, c.data.eval_split)
  x = images.astype(np.float32) / 127.5 - 1
  clip = ClipScorer(argv[1], "clip")
  width = int(clip.task.config.model.embed_dim)
  feat = lambda im: np.sqrt(width) * normalize(clip.image_embeddings(np.asarray(im))).astype(np.float64)
  real = feat(x)
  for factor in (2, 4, 8):
    blurred = np.clip(np.asarray(upsample_bicubic(downsample(jnp.asarray(x), size // factor), size)), -1, 1)
    k, s = fid.kid(real, feat(blurred), subset_size=len(x) // 2, paired=True)
    p, r = fid.precision_recall(real, feat(blurred))
    print(f"bicubic through {size // factor} px: kid {k:.4f} ± {s:.4f}, precision {p:.3f}, recall {r:.3f}")


if __name__ == "__main__":
  main(sys.argv)
