"""A VQ-VAE image tokenizer on bundled MNIST (28×28, grey): ×4 downsampling to a 7×7 grid of codes from a codebook of
256, the image tokens of a DALL-E-style transformer (issue 18).

  python -m diffusion_jax.main --config configs/mnist_vq.py --workdir /tmp/mnist_vq

The codebook is an exponential moving average of the encoder outputs assigned to each code (decay 0.99) with dead
codes restarted at random encoder outputs (`vae.vq.restart_threshold`); `--config.vae.vq.ema_decay=0` learns it
with VQ-VAE's codebook loss instead. Evaluates PSNR/SSIM and the digit-feature Fréchet distance of reconstructions
of 2,000 test digits and the codebook's usage and perplexity over the test split (`codebook`); writes
original|reconstruction pairs. `vae.disc_weight` > 0 adds the PatchGAN (a VQGAN). `:dvae` is DALL-E's discrete VAE
instead: logits over the same 256 codes, the Gumbel-softmax relaxation at a temperature annealed from 1 to 1/16 and
a KL term to the uniform prior warmed up over the first 500 steps. `:tiny` (`:dvae,tiny`) is a seconds-long variant
for tests.
"""
import ml_collections

from diffusion_jax.defaults import evaluator

from . import mnist_vae


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = set(filter(None, arg.split(",")))
  if not args <= {"tiny", "dvae"}:
    raise ValueError(f"unknown config argument {arg!r}; use '', 'tiny', 'dvae' or 'dvae,tiny'")
  tiny = "tiny" in args
  c = mnist_vae.get_config("tiny" if tiny else "")  # the same task, data, losses and evaluators; codes for the KL
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
  if "dvae" in args:
    c.vae.bottleneck = "gumbel"
    c.vae.gumbel = ml_collections.ConfigDict(dict(
        tau_start=1.0, tau_end=1 / 16, anneal_steps=1500,  # exponential anneal, then held
        kl_weight=0.01,  # β on KL(q ‖ uniform) / pixels, relative to the per-pixel L1 reconstruction error
        kl_warmup_steps=500))
  if tiny:
    c.vae.vq.codebook_size = 16
    c.model.update(latent_channels=4, block_out_channels=(8, 16, 16))  # 7 × 7 codes, as the full config
    return c
  c.train.update(steps=2000, batch_size=32)
  return c
