"""A VQ-VAE image tokenizer on 32×32 colour emoji: ×4 downsampling to an 8×8 grid of codes from a codebook of 512,
the image tokens of configs/emoji_dalle.py.

  python -m diffusion_jax.main --config configs/emoji_vq.py --workdir /tmp/emoji_vq

configs/mnist_vq.py's EMA codebook with dead-code restarts on configs/emoji_vae.py's autoencoder; evaluates PSNR/SSIM
of the held-out emoji's reconstructions and the codebook's usage and perplexity. Needs the Noto Color Emoji font, as
configs/emoji_clip.py. `:tiny` is a seconds-long variant for tests.
"""
import ml_collections

from diffusion_jax.defaults import evaluator

from . import emoji_vae


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "tiny"):
    raise ValueError(f"unknown config argument {arg!r}; use '' or 'tiny'")
  c = emoji_vae.get_config(arg)
  c.vae.bottleneck = "vq"
  c.vae.vq = ml_collections.ConfigDict(dict(codebook_size=512, dim=0, beta=0.25, ema_decay=0.99,
                                            restart_threshold=1.0))
  c.model.latent_channels = 16
  c.evals.codebook = evaluator("codebook", batch_size=128)
  if arg == "tiny":
    c.vae.vq.codebook_size = 16
    c.model.latent_channels = 4
  return c
