"""A small KL autoencoder on bundled MNIST (28×28 padded to 32×32, grey): ×4 downsampling to 8×8×4 latents, the first
stage of configs/mnist_ldm.py.

  python -m diffusion_jax.main --config configs/mnist_vae.py --workdir /tmp/mnist_vae

Evaluates PSNR/SSIM and the digit-feature Fréchet distance (rFID) of reconstructions on the MNIST test split and writes original|reconstruction pairs.
`:tiny` is a seconds-long variant for tests.
"""
import ml_collections

from diffusion_jax.defaults import evaluator

from . import emoji_vae


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "tiny"):
    raise ValueError(f"unknown config argument {arg!r}; use '' or 'tiny'")
  c = emoji_vae.get_config(arg)  # the same task and loss; only the data and the sizes differ
  c.data.update(source="mnist", image_size=32, channels=1, random_flip=False)
  # The held-out colour photos say nothing about a digit autoencoder.
  c.evals.photos.every = -1
  c.sample.photos = ()
  c.evals.reconstruction.max_examples = 2000
  # rFID of the same reconstructions on the digit judge's features
  c.evals.fid = evaluator("fid", batch_size=128, features="digits", num_samples=2000, source="heldout")
  if arg == "tiny":
    del c.evals["fid"]  # the digit judge's first use trains it; tests/test_fid.py covers source='heldout'
    return c
  # Digits are simpler than emoji: narrower levels and a bigger batch fit the CPU budget (about 5 minutes).
  c.model.update(block_out_channels=(16, 32, 32), norm_num_groups=8)
  c.train.update(steps=1000, batch_size=32, log_every=100, checkpoint_every=500)
  return c
