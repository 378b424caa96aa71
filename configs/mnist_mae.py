"""Masked-autoencoder pre-training of a small ViT on the 60,000 unlabelled MNIST training images (the 'train' and
'validation' splits; their labels are never read): 75% of each image's 4×4 patches masked.

  python -m diffusion_jax.main --config configs/mnist_mae.py --workdir /tmp/mnist_mae

Evaluates the masked-patch PSNR of held-out test digits and writes original | masked | reconstruction triples; then
configs/mnist_vit.py fine-tunes or probes its encoder on 1% of the labels. `:tiny` is a seconds-long variant for
tests.
"""
import ml_collections

from diffusion_jax.defaults import base_config, evaluator


def model_config() -> ml_collections.ConfigDict:
  """The ViT tower (shared with configs/mnist_vit.py, so a from-scratch classifier is the same network) and MAE's
  decoder."""
  return ml_collections.ConfigDict(dict(
      vision_variant="",  # e.g. 'S/16' (diffusion_jax.models.vit); '' uses the fields below
      patch_size=4, width=128, layers=6, heads=4, mlp_ratio=4, act="gelu",
      decoder_width=64, decoder_layers=2, decoder_heads=4,
      compute_dtype="float32", attention_impl="", remat="none"))


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "tiny"):
    raise ValueError(f"unknown config argument {arg!r}; use '' or 'tiny'")
  c = base_config()
  c.task = "mae"
  c.model = model_config()
  c.mae = ml_collections.ConfigDict(dict(mask_ratio=0.75, norm_pix_loss=False))
  c.evals.reconstruction = evaluator("reconstruction", batch_size=500, max_examples=2000)
  c.sample = ml_collections.ConfigDict(dict(num_images=24, triples_per_row=4, batch_size=500, seed=0))
  c.data.update(image_size=28, train_split="train+validation")
  c.optim.update(lr=1.5e-3, b1=0.9, b2=0.95, weight_decay=0.05, warmup_steps=200)  # MAE's AdamW
  c.ema.enabled = False
  c.train.update(steps=5000, batch_size=256, log_every=100, checkpoint_every=1000)
  if arg == "tiny":
    c.model.update(patch_size=7, width=16, layers=1, heads=2, decoder_width=8, decoder_layers=1, decoder_heads=2)
    c.evals.reconstruction.update(batch_size=32, max_examples=64)
    c.sample.update(num_images=4, triples_per_row=2, batch_size=32)
    c.train.update(steps=3, batch_size=16, log_every=1, checkpoint_every=3, progress_bar=False)
  return c
