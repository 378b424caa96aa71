"""Image-to-text on bundled MNIST, LLaVA's way: a frozen CLIP image tower (a mnist_clip run), a small Llama-style
language model and a projector between them, trained in stages on captions, then on questions about the digit.

  python -m diffusion_jax.main --config configs/mnist_clip.py --workdir /tmp/mnist_clip          # vision tower
  python -m diffusion_jax.main --config configs/mnist_llava.py:lm --workdir /tmp/llava_lm       # stage 0: language
  python -m diffusion_jax.main --config configs/mnist_llava.py:align --workdir /tmp/llava_align \\
      --config.llava.vision_from=/tmp/mnist_clip --config.llava.lm_from=/tmp/llava_lm           # stage 1: projector
  python -m diffusion_jax.main --config configs/mnist_llava.py:instruct --workdir /tmp/llava_instruct \\
      --config.llava.projector_from=/tmp/llava_align                                             # stage 2
  python -m diffusion_jax.main --config configs/mnist_llava.py:instruct --workdir /tmp/llava_instruct \\
      --mode sample --config.sample.images='("a.png", "b.png")' --config.sample.question='What digit is this?'

Stage 2 takes the vision tower and language model its stage-1 run used. The conversations are made on the fly from
the digits (`data.instructions`): captions in the mnist_clip phrasings for stages 0-1; for stage 2 questions (which
digit, even or odd, the digit plus one, "is this a 7?") and some captions. Evaluation asks about the 10,000 test
digits: `eval/caption_digit_accuracy` (the caption names the right digit) and `eval/vqa_accuracy` on question
phrasings training never saw. `python -m diffusion_jax.data.prepare_conversations mnist OUT` writes the same data as
LLaVA-format files (`--config.data.source=conversations --config.data.path=OUT/{split}.jsonl` trains on them).

`,tiny` after the stage is a seconds-long variant for the tests.
"""
import ml_collections

from diffusion_jax.data.instructions import DIGIT_CAPTIONS
from diffusion_jax.defaults import base_config, evaluator

STAGES = {"lm": 0, "align": 1, "instruct": 2}


def get_config(arg: str = "instruct") -> ml_collections.ConfigDict:
  stage, _, size = (arg or "instruct").partition(",")
  if stage not in STAGES or size not in ("", "tiny"):
    raise ValueError(f"unknown config argument {arg!r}; use one of {', '.join(STAGES)}, optionally ',tiny'")
  c = base_config()
  c.task = "llava"
  c.llava = ml_collections.ConfigDict(dict(
      stage=STAGES[stage], vision_from="", lm_from="", projector_from="", train_vision=False,
      # The penultimate block, as LLaVA reads it, with its class token too ('full'): on 28-pixel digits the class
      # token carries the contrastively trained summary that 16 patch tokens only hold in pieces.
      projector="mlp2x_gelu", feature_layer=-2, feature_select="full"))
  # A vision tower and language model built here only when no source gives them (a stage-0 run's vision tower
  # is never used; its sizes only fill the model).
  c.model = ml_collections.ConfigDict(dict(
      patch_size=7, vision_width=32, vision_layers=2, vision_heads=2,
      lm_width=128, lm_layers=4, lm_heads=4, lm_kv_heads=2, lm_mlp_dim=344, tie_embeddings=True,
      pixel_normalization="none"))  # 'clip' for a tower from a real CLIP/SigLIP checkpoint
  c.data.image_size = 28
  c.data.tokenizer = "mnist_chat"  # bundled (diffusion_jax/assets/tokenizers) or a folder with tokenizer.json
  c.data.caption_templates = DIGIT_CAPTIONS
  c.data.conversations = "captions" if stage != "instruct" else "digit_vqa"
  c.data.max_text_len = 40  # 17 image tokens and the conversation (37 tokens at most)
  c.sample = ml_collections.ConfigDict(dict(images=(), count=16, question="What digit is this?", max_new_tokens=16,
                                            temperature=0.0, top_p=1.0))
  c.evals.perplexity = evaluator("perplexity", max_examples=2000, batch_size=500)
  if stage != "lm":
    c.evals.caption = evaluator("caption_digit", batch_size=500)
  if stage == "instruct":
    c.evals.vqa = evaluator("vqa", batch_size=500, heldout=True)
  c.ema.enabled = False
  c.optim.update(lr=2e-3 if stage == "align" else 5e-4, weight_decay=0.0, warmup_steps=50)
  c.train.update(steps={"lm": 600, "align": 300, "instruct": 1200}[stage], batch_size=128, log_every=50,
                 checkpoint_every=200, eval_every=0, sample_at_end=True)
  if size == "tiny":
    c.model.update(lm_width=32, lm_layers=1, lm_heads=2, lm_kv_heads=1, lm_mlp_dim=64)
    c.train.update(steps=2, batch_size=8, log_every=1, checkpoint_every=2, progress_bar=False)
    c.sample.count = 4
    c.llava.feature_layer = -1  # the tiny mnist_clip tower has one block
    for e in c.evals.values():
      e.update(batch_size=16, max_examples=16)
  return c
