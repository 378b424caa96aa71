"""A small KL autoencoder (LDM's first stage) on 32×32 colour emoji: ×4 downsampling to 8×8×4 latents.

  python -m diffusion_jax.main --config configs/emoji_vae.py --workdir /tmp/emoji_vae

Evaluates PSNR/SSIM of reconstructions on the held-out emoji and on scikit-image photos no training set contains
(needs `pip install scikit-image`; `--config.evals.photos.every=-1` skips them), and with an `emoji_clip` run the KID
of the reconstructions in its image space (`--config.evals.fid.every=0 --config.evals.fid.clip_workdir=RUN`). The PatchGAN term is off: at this size
and step budget it costs PSNR and time; `--config.vae.disc_weight=0.5` turns it on, and
`--config.vae.disc_start=N` delays it to step N (taming's schedule). Needs the Noto Color Emoji font, as configs/emoji_clip.py.
`:tiny` is a seconds-long variant for tests.
"""
import ml_collections

from diffusion_jax.defaults import base_config, evaluator, optimizer
from diffusion_jax.eval.image_metrics import SKIMAGE_PHOTOS


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = base_config()
  c.task = "autoencoder"
  c.model = ml_collections.ConfigDict(dict(
      block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
      mid_block_attention=True, compute_dtype="float32", attention_impl="", remat="none",
      init_from="",  # a diffusers AutoencoderKL folder to fine-tune (its architecture replaces the fields above)
      allow_pickle=False))
  c.vae = ml_collections.ConfigDict(dict(
      rec_loss="l1",  # 'l1' | 'l2', per-pixel mean
      kl_weight=1e-6,  # LDM's weight, relative to the summed reconstruction error
      sample_posterior=True,
      disc_weight=0.0,  # > 0 adds a PatchGAN discriminator, hinge loss, adaptive weight times this
      disc_start=0, disc_channels=32, disc_layers=2, disc_norm_groups=8,
      # LPIPS-VGG weights (`python -m diffusion_jax.pretrained.lpips OUT.safetensors` makes them) turn on the
      # perceptual term, weighted as in LDM; a pickle file needs model.allow_pickle.
      lpips_path="", perceptual_weight=1.0))
  c.evals.reconstruction = evaluator("reconstruction", batch_size=128)
  c.evals.photos = evaluator("photos", batch_size=128, photos=SKIMAGE_PHOTOS, crops=5)
  # rKID of the held-out emoji's reconstructions in an emoji CLIP's image space (122 images are too few for a
  # Fréchet distance on its 128-d features); off until given one:
  # --config.evals.fid.every=0 --config.evals.fid.clip_workdir=/tmp/emoji_clip
  c.evals.fid = evaluator("fid", every=-1, batch_size=128, features="clip", num_samples=0, frechet=False,
                          source="heldout")
  c.sample = ml_collections.ConfigDict(dict(num_images=16, pairs_per_row=4, batch_size=128, photos=SKIMAGE_PHOTOS,
                                            photo_crops=5))

  c.data.update(source="emoji", image_size=32, channels=3, random_flip=True, max_text_len=8)
  c.optim.update(lr=1e-3, b1=0.5, b2=0.9, warmup_steps=100, weight_decay=0.0)  # taming's Adam betas
  c.disc_optim = optimizer(lr=1e-3, b1=0.5, b2=0.9, warmup_steps=100, weight_decay=0.0)  # the discriminator's
  c.ema.update(enabled=True, decay=0.999, updates=("vae",))  # no EMA of the discriminator
  c.train.update(steps=2500, batch_size=16, log_every=100, checkpoint_every=500, eval_every=0)

  if arg == "tiny":
    c.model.update(block_out_channels=(8, 16), norm_num_groups=4, mid_block_attention=False)
    c.vae.update(disc_channels=8, disc_layers=1, disc_norm_groups=4)
    c.evals.reconstruction.batch_size = 64
    c.evals.photos.update(batch_size=64, photos=("astronaut", "coffee"), crops=2)
    c.sample.update(num_images=4, pairs_per_row=2, batch_size=64, photos=("astronaut", "coffee"), photo_crops=2)
    c.train.update(steps=2, batch_size=16, log_every=1, checkpoint_every=2, eval_every=0, progress_bar=False)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; use '' or 'tiny'")
  return c
