"""DALL-E 1 on bundled MNIST: a transformer over a caption's words and a `mnist_vq` run's 7×7 image codes, sampled
with guidance on the logits and reranked by a `mnist_clip` run.

  python -m diffusion_jax.main --config configs/mnist_clip.py --workdir /tmp/mnist_clip   # the reranking CLIP
  python -m diffusion_jax.main --config configs/mnist_vq.py --workdir /tmp/mnist_vq       # the image tokenizer
  python -m diffusion_jax.main --config configs/mnist_dalle.py --workdir /tmp/mnist_dalle \\
      --config.dalle.vq_workdir=/tmp/mnist_vq --config.dalle.clip_workdir=/tmp/mnist_clip

The end-of-run evaluation judges 50 samples per digit with the independent MNIST classifier twice: one draw per
caption (`digit_accuracy_single`) and the best of `sample.candidates` = 8 by the CLIP (`digit_accuracy`), the paper's
reranking; and the test digits' exact image-token NLL given their captions (`image_nll`). `:tiny` is a seconds-long
variant for tests (its VQ and CLIP runs are the tests' own).
"""
import ml_collections

from diffusion_jax.defaults import base_config, evaluator


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "tiny"):
    raise ValueError(f"unknown config argument {arg!r}; use '' or 'tiny'")
  c = base_config()
  c.task = "dalle"
  c.data.update(image_size=28, tokenizer="words", max_text_len=16)
  c.model = ml_collections.ConfigDict(dict(width=128, layers=4, heads=4, mlp_dim=512, compute_dtype="float32",
                                           attention_impl="", remat="none"))
  c.dalle = ml_collections.ConfigDict(dict(
      vq_workdir="",  # a finished VQ autoencoder run (configs/mnist_vq.py): the image tokenizer, frozen
      clip_workdir="",  # a finished contrastive run (configs/mnist_clip.py) that reranks samples; '' = none
      text_loss_weight=1 / 8,  # the paper's weight of the caption's tokens; the image's is the rest
      cond_drop_prob=0.1))  # rows trained on the empty caption, for guidance
  c.sample = ml_collections.ConfigDict(dict(
      prompts=(), template="", per_prompt=8, seed=0, batch_size=256,
      temperature=1.0, top_k=0, top_p=1.0, guidance_scale=3.0,
      candidates=8,  # images drawn per caption; the reranking CLIP keeps one (1: no reranking)
      complete_rows=0,  # > 0: `--mode sample` completes held-out images from their first rows of codes instead
      complete_images=8))  # ... this many, each followed by per_prompt completions
  c.ema.decay = 0.995
  c.optim.update(lr=1e-3, warmup_steps=200, weight_decay=0.01)
  c.train.update(steps=2500, batch_size=64, log_every=100, checkpoint_every=500)
  c.evals.loss = evaluator("loss", batch_size=256, batches=4)
  c.evals.nll = evaluator("image_nll", batch_size=256)
  c.evals.digits_single = evaluator("digit_accuracy", per_class=50, candidates=1, key="digit_accuracy_single")
  c.evals.digits = evaluator("digit_accuracy", per_class=50)
  if arg == "tiny":
    c.model.update(width=16, layers=1, heads=2, mlp_dim=32)
    c.sample.update(per_prompt=2, batch_size=16, candidates=2)
    c.train.update(steps=2, batch_size=8, log_every=1, checkpoint_every=2, progress_bar=False)
    c.evals.loss.update(batch_size=8, batches=1)
    c.evals.nll.update(batch_size=8, max_examples=8)
    c.evals.digits_single.update(per_class=1, frechet=False, diversity=False)
    c.evals.digits.update(per_class=1, frechet=False, diversity=False)
  return c
