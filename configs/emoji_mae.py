"""Masked-autoencoder pre-training on the 32×32 colour emoji (captions unused): 75% of each emoji's 4×4 patches
masked and reconstructed; the held-out emoji's masked-patch PSNR says how well.

  python -m diffusion_jax.main --config configs/emoji_mae.py --workdir /tmp/emoji_mae

Writes original | masked | reconstruction triples of held-out emoji. Needs the Noto Color Emoji font, as
configs/emoji_clip.py. `:tiny` is a seconds-long variant for tests.
"""
import ml_collections

from . import mnist_mae


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = mnist_mae.get_config(arg)  # the same task, model and recipe; only the data and the budget differ
  c.data.update(source="emoji", image_size=32, channels=3, random_flip=True, train_split="train", max_text_len=8)
  c.evals.reconstruction.update(max_examples=0)
  if arg == "tiny":
    c.model.patch_size = 8  # 32 px in 4 × 4 patches
  else:
    c.sample.update(num_images=24, batch_size=128)
    c.evals.reconstruction.batch_size = 128
    c.train.update(steps=3000, batch_size=64, log_every=100, checkpoint_every=1000)
  return c
