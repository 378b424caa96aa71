"""A diffusion upsampler on colour emoji, 32 → 64 px: a U-Net conditioned on the blurred low-resolution emoji
(DALL-E 2's first upsampler), evaluated against bicubic upsampling on the held-out emoji and on scikit-image photo
crops no training set holds.

  python -m diffusion_jax.main --config configs/emoji_upsampler.py --workdir /tmp/emoji_upsampler

Measured (README, "Upsamplers"; idle 2-core CPU): 18 min; held-out emoji 24.8 dB / 0.805 PSNR / SSIM against
bicubic's 26.5 dB / 0.907 (it still loses). Needs the Noto Color Emoji font, as configs/emoji_clip.py; the emoji are
rendered at 64 px. `--mode sample` writes bicubic | upsampled | original triplets of held-out emoji. `:tiny` is a seconds-long 8 → 16 px variant for tests.
"""
import ml_collections

from diffusion_jax.defaults import evaluator
from . import mnist_upsampler


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = mnist_upsampler.get_config(arg)  # the same U-Net, blur augmentation and evaluation; emoji at 64 px
  c.data.update(source="emoji", image_size=64, channels=3, random_flip=True, max_text_len=8)
  # KID of the upsampled held-out emoji in an emoji CLIP's image space; off until given one:
  # --config.evals.fid.every=0 --config.evals.fid.clip_workdir=/tmp/emoji_clip
  c.evals.fid = evaluator("fid", every=-1, batch_size=64, features="clip", num_samples=0, frechet=False,
                          source="heldout")
  if arg == "tiny":
    c.data.image_size = 16
    return c
  c.sample.batch_size = 64
  c.evals.loss.update(batch_size=64, batches=2)
  c.upsample.low_res_size = 32
  c.train.update(steps=1600, batch_size=16, checkpoint_every=800)
  c.evals.upsampler.update(batch_size=64, max_examples=0)
  return c
