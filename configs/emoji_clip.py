"""CLIP trained from scratch on colour emoji captioned by their Unicode names, with the real CLIP BPE tokenizer;
image↔text retrieval recall on the held-out emoji (see diffusion_jax/data/emoji.py for the split).

  python -m diffusion_jax.main --config configs/emoji_clip.py --workdir /tmp/emoji_clip

Needs the Noto Color Emoji font (`apt-get install fonts-noto-color-emoji`, or give its path in data.path). Every
emoji has its own caption, so the held-out recall measures how far names generalise to unseen pictures ("cat
face" after "dog face", "smiling face with halo" after "smiling face with sunglasses"); `--config.data.eval_split=train`
measures how well the training pairs were learnt. `:tiny` is a seconds-long variant for tests.
"""
from diffusion_jax.defaults import base_config, evaluator
from .mnist_clip import model_config
import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = base_config()
  c.task = "contrastive"
  c.model = model_config()
  # 8x8 patches (16 tokens): the 4x4 grid keeps a run near ten minutes on a 2-core CPU.
  c.model.update(patch_size=8, vision_width=128, vision_layers=4, vision_heads=4, text_width=128, text_layers=3,
                 text_heads=4, embed_dim=128)
  c.contrastive = ml_collections.ConfigDict(dict(
      loss="clip", logit_scale_init=ml_collections.config_dict.placeholder(float),
      logit_bias_init=ml_collections.config_dict.placeholder(float)))
  c.evals.retrieval = evaluator("retrieval", batch_size=128)

  c.data.update(source="emoji", image_size=32, channels=3, random_flip=True, tokenizer="clip", max_text_len=32)
  c.ema.enabled = False
  c.optim.update(lr=1e-3, weight_decay=0.1, warmup_steps=100)
  c.train.update(steps=1000, batch_size=128, log_every=100, checkpoint_every=500, eval_every=500,
                 sample_at_end=False)

  if arg == "tiny":
    c.model.update(patch_size=8, vision_width=16, vision_layers=1, vision_heads=2, text_width=16, text_layers=1,
                   text_heads=2, embed_dim=8)
    c.train.update(steps=2, batch_size=16, log_every=1, checkpoint_every=2, eval_every=0, progress_bar=False)
    c.evals.retrieval.batch_size = 64
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; use '' or 'tiny'")
  return c
