"""A VQ-VAE image tokenizer on bundled MNIST (28×28, grey): ×4 downsampling to a 7×7 grid of codes from a codebook of
256, the image tokens of a DALL-E-style transformer (issue 18).

  python -m diffusion_jax.main --config configs/mnist_vq.py --workdir /tmp/mnist_vq

The codebook is an exponential moving average of the encoder outputs assigned to each code (decay 0.99) with dead
codes restarted at random encoder outputs (`vae.vq.restart_threshold`); `--config.vae.vq.ema_decay=0` learns it
with VQ-VAE's codebook loss instead. Evaluates PSNR/SSIM and the digit-feature Fréchet distance of reconstructions
of 2,000 test digits and the codebook's usage and perplexity over the test split (`codebook`); writes
original|reconstruction pairs. `vae.disc_weight` > 0 adds the PatchGAN (a VQGAN). `:tiny` is a seconds-long
variant for tests.
"""
import ml_collections

from diffusion_jax.defaults import evaluator

from . import mnist_vae


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "tiny"):
    raise ValueError(f"unknown config argument {arg!r}; use '' or 'tiny'")
  c = mnist_vae.get_config(arg)  # the same task, data, losses and evaluators; a codebook instead of the KL term
  c.data.image_size = 28  # 7×7 = 49 tokens per digit
  c.vae.bottleneck = "vq"
  c.vae.vq = ml_collections.ConfigDict(dict(
      codebook_size=256,
      dim=0,  # the codebook's width; 0 = model.latent_channels
      beta=0.25,  # commitment weight
      ema_decay=0.99,  # 0: a learned codebook (codebook loss)
      restart_threshold=1.0))  # EMA assignments per step below which a code restarts; 0 = never
  c.model.latent_channels = 16
  c.evals.codebook = evaluator("codebook", batch_size=128)
  if arg == "tiny":
    c.vae.vq.codebook_size = 16
    c.model.update(latent_channels=4, block_out_channels=(8, 16, 16))  # 7 × 7 codes, as the full config
    return c
  c.train.update(steps=2000, batch_size=32)
  return c
