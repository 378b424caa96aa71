"""Latent text-to-image diffusion on bundled MNIST: a U-Net on the 8×8×4 latents of a frozen VAE, conditioned on
captions by the frozen text tower of a CLIP run. Three commands, each a run of this repository:

  python -m diffusion_jax.main --config configs/mnist_clip.py --workdir /tmp/mnist_clip   # text tower (~6.5 min)
  python -m diffusion_jax.main --config configs/mnist_vae.py --workdir /tmp/mnist_vae     # autoencoder (~8.5 min)
  python -m diffusion_jax.main --config configs/mnist_ldm.py --workdir /tmp/mnist_ldm \\
      --config.latent.vae_workdir=/tmp/mnist_vae --config.text.clip_workdir=/tmp/mnist_clip  # ~25 min

The first training run encodes the 50,000 training digits once into WORKDIR/latent_cache (ArrayRecord: latents, tokens
and the tower's text states) and estimates the latents' scale (1/std, WORKDIR/latent_scale.json); resumed runs read
both back. `--config.latent.cache=False` encodes every batch inside the training step instead;
`--config.model.conditioners='("text",)' --config.text.clip_workdir=''` trains a caption encoder with the U-Net (the
first command is then not needed). The end-of-run eval decodes 50
guided samples per digit and reports eval/digit_accuracy, the share an independent MNIST classifier recognises, for
the training captions' phrasing and (eval/digit_accuracy_heldout) for two the U-Net never saw; the sample grid
(WORKDIR/samples/step_N/grid.png, a row per digit) is prompted with a held-out phrasing.

`:tiny` is a seconds-long variant for the tests (give it a VAE run, e.g. configs/mnist_vae.py:tiny).
"""
import ml_collections

from . import mnist_ddpm
from diffusion_jax.defaults import evaluator


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "tiny"):
    raise ValueError(f"unknown config argument {arg!r}; use '' or 'tiny'")
  c = mnist_ddpm.get_config(arg)  # the same task, schedule and evaluation; the denoiser sees latents
  c.model.conditioners = ("clip_text",)  # the frozen text tower of text.clip_workdir
  c.latent.update(cache=True)  # latent.vae_workdir: a finished autoencoder run (configs/mnist_vae.py)
  c.sample.update(clip_x0=False, negative_prompt="")  # latents have no fixed range to clip to
  # The U-Net trains on one phrasing; evaluation and the sample grid also prompt with phrasings it never saw
  # (the CLIP run did), so they measure the frozen text tower's generalisation, not a memorised sentence.
  c.data.caption_templates = ("a handwritten digit {name}",)
  c.evals.digits_heldout = evaluator("digit_accuracy", per_class=50, heldout=True, key="digit_accuracy_heldout",
                                     templates=("a photo of the number {name}", "{name}"), every=-1 if arg else 0)
  c.sample.template = "a photo of the number {name}"
  if arg == "tiny":
    c.latent.scale_examples = 256
    c.data.max_text_len = 16  # configs/mnist_clip.py:tiny's
    c.train.steps = 2
    return c
  c.data.image_size = 32  # MNIST padded by 2 px: the VAE's ×4 downsampling then gives 8×8 latents
  # 8×8 latents are 12× fewer positions than 28×28 pixels: wider levels for the same cost, attention at both.
  c.model.update(block_out_channels=(64, 128), attention_levels=(True, True), norm_num_groups=16)
  c.sample.update(sampler="dpmpp_2m", num_steps=25)
  c.train.update(steps=1000, checkpoint_every=500)
  return c
