"""A diffusion upsampler on colour emoji, 32 → 64 px: a U-Net conditioned on the blurred low-resolution emoji
(DALL-E 2's first upsampler), evaluated against bicubic upsampling on the held-out emoji and on scikit-image photo
crops no training set holds.

  python -m diffusion_jax.main --config configs/emoji_upsampler.py --workdir /tmp/emoji_upsampler

Needs the Noto Color Emoji font, as configs/emoji_clip.py; the emoji are rendered at 64 px. `--mode sample` writes
bicubic | upsampled | original triplets of held-out emoji. `:tiny` is a seconds-long 8 → 16 px variant for tests.
"""
import ml_collections

from diffusion_jax.defaults import diffusion_config, evaluator, tiny_diffusion_run
from diffusion_jax.eval.image_metrics import SKIMAGE_PHOTOS


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "tiny"):
    raise ValueError(f"unknown config argument {arg!r}; use '' or 'tiny'")
  c = diffusion_config()
  c.task = "upsampler"
  # No text, no attention: the low-res emoji (bilinearly upsampled, as 3 extra input channels) is the whole condition.
  c.model.update(conditioners=("low_res",), block_out_channels=(16, 32, 64), layers_per_block=1,
                 attention_levels=(False, False, False), mid_block_attention=False)
  c.diffusion.update(cond_drop_prob=0.0)  # not guided
  c.upsample.update(low_res_size=32, augment="blur", blur_sigma=(0.4, 0.6), sample_images=16)
  c.sample.update(sampler="dpmpp_2m", num_steps=25, batch_size=64)
  c.data.update(source="emoji", image_size=64, channels=3, random_flip=True, max_text_len=8)
  c.ema.decay = 0.995
  c.optim.update(lr=2e-3, warmup_steps=100)
  c.train.update(steps=400, batch_size=16, log_every=100, checkpoint_every=400)
  c.evals.loss.update(batch_size=64, batches=2)
  c.evals.upsampler = evaluator("upsampler", batch_size=64, max_examples=0, photos=SKIMAGE_PHOTOS, crops=5)

  if arg == "tiny":
    c.model.update(block_out_channels=(8,), attention_levels=(False,), norm_num_groups=4)
    tiny_diffusion_run(c)
    c.upsample.update(low_res_size=8, sample_images=8)
    c.evals.upsampler.update(batch_size=8, max_examples=8, photos=())
  del c.evals["digits"]  # an upsampler draws no digits of its own
  return c
