"""unCLIP (DALL-E 2) on colour emoji: a 32 px decoder conditioned on an `emoji_clip` run's image embeddings, followed
by a 32 → 64 px diffusion upsampler (configs/emoji_upsampler.py), judged by DALL-E 2's image variations.

  python -m diffusion_jax.main --config configs/emoji_clip.py --workdir /tmp/emoji_clip            # the CLIP
  python -m diffusion_jax.main --config configs/emoji_upsampler.py --workdir /tmp/emoji_upsampler  # 32 → 64 px
  python -m diffusion_jax.main --config configs/emoji_unclip.py --workdir /tmp/emoji_unclip \\
      --config.text.clip_workdir=/tmp/emoji_clip \\
      --config.unclip.upsampler_workdirs='("/tmp/emoji_upsampler",)'

The decoder trains on the image tower's embeddings of the training emoji (the upsampler is only restored, frozen, to
run after it). The end-of-run `variations` evaluation decodes `per_image` variations of every held-out emoji from its
own CLIP image embedding, with the empty caption, through the whole cascade, and reports the CLIP image–image cosine
of each variation to its source against the cosine of random pairs of distinct held-out emoji (the baseline), and how
often the source is the variation's nearest held-out emoji (`evaluators/unclip.py`). Without the upsampler the
variations stay at 32 px. Variations of any image file:
  ... --mode sample --config.sample.variations_of='("a.png", "b.png")'

Measured (README, "unCLIP on emoji"; idle 2-core CPU): 1,500 steps × 32 in 25 min; variations of the 122 held-out
emoji through decoder and upsampler at CLIP cosine 0.554 to their source against 0.020 for random pairs, the source
the nearest held-out emoji to 37.5% of them (chance 0.8%).

Needs the Noto Color Emoji font, as configs/emoji_clip.py. `:tiny` is a seconds-long variant for the tests.
"""
import ml_collections

from diffusion_jax.defaults import evaluator
from . import mnist_unclip


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "tiny"):
    raise ValueError(f"unknown config argument {arg!r}; use '' or 'tiny'")
  tiny = arg == "tiny"
  c = mnist_unclip.decoder_config(tiny)  # its `tiny` block shrinks the model and the loop
  # configs/emoji_clip.py's data: every emoji is captioned by its Unicode name (no templates are used)
  c.data.update(source="emoji", image_size=32, channels=3, random_flip=True, tokenizer="clip", max_text_len=32)
  del c.evals["digits"]  # no digits to judge: the decoder's CLIP judges the variations instead
  c.evals.variations = evaluator("variations", batch_size=64, max_examples=0, per_image=4, seed=0)
  # KID of one variation of each held-out emoji against them, in the decoder's CLIP space (122 images: too few for
  # a Fréchet distance on 128-d features)
  c.evals.fid = evaluator("fid", batch_size=64, features="clip", num_samples=0, frechet=False, source="heldout")
  # `--mode sample` (and the end of training) writes variations of the first 8 held-out emoji, each row the source
  # and 4 variations
  c.sample.update(variations_heldout=8, per_prompt=4)
  if tiny:
    c.evals.variations.update(batch_size=16, max_examples=4, per_image=2)
    c.evals.fid.update(batch_size=16, num_samples=4)
    c.sample.variations_heldout = 2
    return c
  # 32 → 16 → 8 px, cross-attention (the 4 image-embedding tokens and the name's tokens) at 16 and 8 px; about one
  # step a second on 2 CPU cores (3.1e10 FLOPs)
  c.model.update(block_out_channels=(16, 32, 64), attention_levels=(False, True, True))
  c.sample.batch_size = 64
  c.train.update(steps=1500, batch_size=32, checkpoint_every=500)
  return c
