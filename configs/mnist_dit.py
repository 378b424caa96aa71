"""Class-conditional DiT on bundled MNIST pixels (no text tower): DDPM (ε) or rectified flow, on a 2-core CPU.

  python -m diffusion_jax.main --config configs/mnist_dit.py --workdir /tmp/mnist_dit            # ε, DPM++ 2M
  python -m diffusion_jax.main --config configs/mnist_dit.py:flow --workdir /tmp/mnist_dit_flow  # flow, Euler

Arguments (comma-separated): '' or 'flow' picks the objective; 'tiny' shrinks everything to a seconds-long run for
the tests ('tiny', 'flow,tiny'). The end-of-run eval reports eval/digit_accuracy: the share of class-conditional
samples (guided) that an independent MNIST classifier labels as the requested digit.
"""
import ml_collections

from configs.common import base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = set(filter(None, arg.split(",")))
  unknown = args - {"flow", "tiny"}
  if unknown:
    raise ValueError(f"unknown config argument(s) {sorted(unknown)}; use '', 'flow', 'tiny' or 'flow,tiny'")
  c = base_config()
  c.task = "diffusion"

  # 28 px with 4x4 patches: 49 tokens, cheap enough for a CPU (17 GFLOP per step of 64); MNIST strokes survive the
  # coarse grid because each token predicts its whole 4x4 patch. The non-zero sizes override the variant's.
  c.model = ml_collections.ConfigDict(dict(
      denoiser="dit", variant="small/4", patch_size=4, hidden_size=128, depth=4, num_heads=4, mlp_ratio=4.0,
      text_conditioning=False, num_classes=10, text_width=0, compute_dtype="float32", attention_impl=""))
  c.diffusion = ml_collections.ConfigDict(dict(
      objective="diffusion", schedule="cosine", num_timesteps=1000, beta_start=1e-4, beta_end=2e-2,
      prediction_type="epsilon", cond_drop_prob=0.1))
  c.flow = ml_collections.ConfigDict(dict(time_sampling="logit_normal", logit_mean=0.0, logit_std=1.0))
  c.sample = ml_collections.ConfigDict(dict(
      sampler="dpmpp_2m", num_steps=20, eta=0.0, use_karras_sigmas=False, shift=1.0, clip_x0=True,
      guidance_scale=3.0, guidance_rescale=0.0, prompts=(), per_prompt=8, seed=0, batch_size=100))
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=256, loss_batches=4, digit_accuracy_samples_per_class=50, classifier_cache_dir=""))

  c.data.image_size = 28
  c.data.tokenizer = "words"  # tokens are made but unused: the model reads only the label
  c.data.max_text_len = 16
  c.ema.decay = 0.999
  c.train.steps = 3000
  c.train.batch_size = 64
  c.train.log_every = 100
  c.train.checkpoint_every = 500
  c.train.eval_every = 0  # evaluation and sampling run at the end (train.eval_at_end, train.sample_at_end)
  c.train.sample_every = 0
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 200

  if "flow" in args:
    c.diffusion.objective = "flow"
    c.sample.sampler = "flow_euler"

  if "tiny" in args:
    c.model.update(variant="tiny/4", patch_size=0, hidden_size=0, depth=0, num_heads=0)
    c.data.image_size = 16
    c.train.steps = 4
    c.train.batch_size = 8
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    c.train.progress_bar = False
    c.train.eval_at_end = c.train.sample_at_end = False
    c.sample.num_steps = 4
    c.sample.per_prompt = 1
    c.sample.batch_size = 10
    c.eval.batch_size = 8
    c.eval.loss_batches = 1
    c.eval.digit_accuracy_samples_per_class = 0
  return c
