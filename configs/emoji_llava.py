"""Image-to-text on the bundled colour emoji: captions of emoji never seen in training, from a frozen emoji_clip
image tower, a small Llama-style language model and a projector, trained LLaVA's way (configs/mnist_llava.py).

  python -m diffusion_jax.main --config configs/emoji_clip.py --workdir /tmp/emoji_clip            # vision tower
  python -m diffusion_jax.main --config configs/emoji_llava.py:lm --workdir /tmp/emoji_lm
  python -m diffusion_jax.main --config configs/emoji_llava.py:align --workdir /tmp/emoji_align \\
      --config.llava.vision_from=/tmp/emoji_clip --config.llava.lm_from=/tmp/emoji_lm
  python -m diffusion_jax.main --config configs/emoji_llava.py:instruct --workdir /tmp/emoji_instruct \\
      --config.llava.projector_from=/tmp/emoji_align --config.evals.caption.clip_workdir=/tmp/emoji_clip

Every emoji is captioned by its Unicode name; evaluation captions the 122 held-out emoji and reports
`eval/caption_f1` (token F1 against their names) beside `eval/caption_f1_nearest_caption`, the F1 of a baseline that
gives each held-out emoji the training name whose emoji_clip text embedding is nearest to the image's, and the CLIP
scores of both (given `evals.caption.clip_workdir`). Needs the Noto Color Emoji font, as configs/emoji_clip.py does.
"""
import ml_collections

from . import mnist_llava
from diffusion_jax.defaults import evaluator


def get_config(arg: str = "instruct") -> ml_collections.ConfigDict:
  stage, _, size = (arg or "instruct").partition(",")
  c = mnist_llava.get_config(arg)
  c.data.update(source="emoji", image_size=32, channels=3, random_flip=False, tokenizer="emoji_chat",
                conversations="captions", max_text_len=40, caption_templates=("{name}",))
  c.model.update(patch_size=8)
  c.sample.question = "Describe the image briefly."
  for name in ("caption", "vqa"):
    if name in c.evals:
      del c.evals[name]
  if stage != "lm":
    c.evals.caption = evaluator("caption_f1", batch_size=122, max_new_tokens=16)
  c.evals.perplexity.update(batch_size=122, max_examples=0)
  # 1,283 training emoji: an epoch is 10 steps of 128, so these are tens of epochs.
  c.train.update(steps={"lm": 400, "align": 300, "instruct": 600}[stage])
  if size == "tiny":
    c.train.update(steps=2, batch_size=8)
    for e in c.evals.values():
      e.update(batch_size=8, max_examples=8)
  return c
