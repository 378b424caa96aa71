"""A diffusion upsampler on bundled MNIST, 14 → 28 px: a U-Net conditioned on the blurred low-resolution digit
(DALL-E 2's first upsampler at MNIST scale), evaluated against bicubic upsampling.

  python -m diffusion_jax.main --config configs/mnist_upsampler.py --workdir /tmp/mnist_upsampler

The end-of-run evaluation (`upsampler`) reports PSNR and SSIM of the upsampled held-out digits and of bicubic's, and
the same on scikit-image photo crops no training set holds (`--config.evals.upsampler.photos='()'` skips them); `fid`
the Fréchet distance of 512 upsampled held-out digits to the originals on the digit judge's features.
`--mode sample` writes bicubic | upsampled | original triplets of held-out digits. After unCLIP's decoder
(configs/mnist_unclip.py, 28 px) a stage must take 28 px: train one with `--config.data.image_size=56
--config.upsample.low_res_size=28` and give it to the decoder as `--config.unclip.upsampler_workdirs='("W",)'`.
`--config.upsample.augment=noise` trains Imagen's noise augmentation instead of the blur.
`:tiny` is a seconds-long 8 → 16 px variant for the tests.
"""
import ml_collections

from diffusion_jax.defaults import diffusion_config, evaluator, tiny_diffusion_run
from diffusion_jax.eval.image_metrics import SKIMAGE_PHOTOS


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "tiny"):
    raise ValueError(f"unknown config argument {arg!r}; use '' or 'tiny'")
  c = diffusion_config()
  c.task = "upsampler"
  # No text, no attention: the low-res digit (bilinearly upsampled, as 1 extra input channel) is the whole condition.
  c.model.update(conditioners=("low_res",), block_out_channels=(16, 32, 64), layers_per_block=1,
                 attention_levels=(False, False, False), mid_block_attention=False)
  c.diffusion.update(cond_drop_prob=0.0)  # not guided
  c.upsample.update(low_res_size=14, augment="blur", blur_sigma=(0.4, 0.6), sample_images=16)
  c.sample.update(sampler="dpmpp_2m", num_steps=25, batch_size=128)
  c.data.image_size = 28
  c.ema.decay = 0.995
  c.optim.update(lr=2e-3, warmup_steps=100)
  c.train.update(steps=800, batch_size=32, log_every=100, checkpoint_every=400)
  c.evals.upsampler = evaluator("upsampler", batch_size=128, max_examples=256, photos=SKIMAGE_PHOTOS, crops=5)
  # the Fréchet distance of upsampled held-out digits to the originals on the digit judge's features
  c.evals.fid = evaluator("fid", batch_size=128, features="digits", num_samples=512, source="heldout")

  if arg == "tiny":
    c.model.update(block_out_channels=(8,), attention_levels=(False,), norm_num_groups=4)
    tiny_diffusion_run(c)
    c.upsample.update(low_res_size=8, sample_images=8)
    c.evals.upsampler.update(batch_size=8, max_examples=8, photos=())
    del c.evals["fid"]  # the digit judge's first use trains it; tests/test_fid.py covers source='heldout'
  del c.evals["digits"]  # an upsampler draws no digits of its own
  return c
