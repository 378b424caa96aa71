"""CLIP trained from scratch on bundled MNIST with captions; zero-shot digit classification on the test split.

  python -m diffusion_jax.main --config configs/mnist_clip.py --workdir /tmp/mnist_clip

`:siglip` trains with the sigmoid loss instead of softmax InfoNCE; `:tiny` is a seconds-long variant for tests.
"""
import ml_collections

from diffusion_jax.defaults import base_config, evaluator

# Several phrasings, so the text tower learns the digit word rather than one fixed sentence; zero-shot
# evaluation averages the class embedding over the same templates.
TEMPLATES = (
    "a handwritten digit {name}",
    "a photo of the number {name}",
    "the digit {name}, written by hand",
    "a black and white image of a {name}",
    "{name}",
)


def model_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      vision_variant="",  # e.g. 'S/16' for a named ViT (diffusion_jax.models.vit); '' uses the fields below
      patch_size=7, vision_width=96, vision_layers=4, vision_heads=4, vision_pooling="cls",
      text_width=64, text_layers=2, text_heads=4, mlp_ratio=4, act="gelu", embed_dim=64,
      pixel_normalization="none",  # 'clip' for towers from a real checkpoint (OpenAI mean/std)
      init_from="",  # a transformers CLIPModel folder to start both towers from
      allow_pickle=False, lock_image_tower=False, compute_dtype="float32", attention_impl="",
      remat="none"))  # 'none' | 'full' | 'dots_saveable' per encoder layer (diffusion_jax/models/remat.py)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = base_config()
  c.task = "contrastive"
  c.model = model_config()
  c.contrastive = ml_collections.ConfigDict(dict(
      loss="clip", logit_scale_init=ml_collections.config_dict.placeholder(float),
      logit_bias_init=ml_collections.config_dict.placeholder(float)))
  c.evals.zero_shot = evaluator("zero_shot", batch_size=500, max_examples=10000)
  c.evals.retrieval = evaluator("retrieval", batch_size=500, max_examples=10000)

  c.data.image_size = 28
  c.data.caption_templates = TEMPLATES
  c.data.tokenizer = "words"
  c.data.max_text_len = 16
  c.ema.enabled = False
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.1
  c.optim.warmup_steps = 100
  c.train.steps = 600
  c.train.batch_size = 256
  c.train.log_every = 100
  c.train.checkpoint_every = 200
  c.train.eval_every = 200
  c.train.sample_at_end = False

  variant, _, size = arg.partition(",")
  if variant == "siglip":
    c.contrastive.loss = "siglip"
  elif variant not in ("", "tiny"):
    raise ValueError(f"unknown config argument {arg!r}; use '', 'siglip' or 'tiny' (optionally ',tiny')")
  if "tiny" in (variant, size):
    c.model.update(patch_size=7, vision_width=16, vision_layers=1, vision_heads=2, text_width=16, text_layers=1,
                   text_heads=2, embed_dim=8)
    c.train.update(steps=4, batch_size=16, log_every=2, checkpoint_every=2, progress_bar=False)
    for e in (c.evals.zero_shot, c.evals.retrieval):
      e.update(batch_size=64, max_examples=128)
  return c
