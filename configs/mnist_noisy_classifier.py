"""A noise-aware digit classifier on bundled MNIST (diffusion_jax/tasks/noisy_classifier.py), for classifier guidance
of an unconditional diffusion model with the same noise schedule (configs/mnist_ddpm.py:unconditional):

  python -m diffusion_jax.main --config configs/mnist_noisy_classifier.py --workdir /tmp/mnist_noisy_clf
  python -m diffusion_jax.main --config configs/mnist_ddpm.py:unconditional --workdir /tmp/mnist_uncond --mode eval \\
      --config.sample.classifier_guidance.workdir=/tmp/mnist_noisy_clf --config.sample.classifier_guidance.scale=4

The classifier is the U-Net's encoder half (16, 32, 64) with its time embedding, pooled to a linear head (ADM's
classifier at MNIST size), trained on digits noised to uniform time steps of the cosine schedule. `:tiny` is a
seconds-long variant for the tests.
"""
import ml_collections

from diffusion_jax.defaults import base_config, diffusion_config, evaluator


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "tiny"):
    raise ValueError(f"unknown config argument {arg!r}; use '' or 'tiny'")
  c = base_config()
  c.task = "noisy_classifier"
  # The schedule of the runs it guides (diffusion_config's: cosine, 1,000 steps).
  schedule = diffusion_config().diffusion
  c.diffusion = ml_collections.ConfigDict({k: schedule[k] for k in ("schedule", "num_timesteps", "beta_start",
                                                                    "beta_end")})
  c.model = ml_collections.ConfigDict(dict(
      block_out_channels=(16, 32, 64), layers_per_block=1, attention_levels=(False, False, False),
      mid_block_attention=True, num_attention_heads=4, norm_num_groups=8,
      num_classes=0,  # 0: len(data.class_names)
      compute_dtype="float32", remat="none"))
  c.data.image_size = 28
  c.ema.decay = 0.995
  c.optim.update(lr=2e-3, warmup_steps=200, weight_decay=0.05)
  c.train.update(steps=2000, batch_size=64, log_every=100, checkpoint_every=1000, sample_at_end=False)
  c.evals.noisy = evaluator("noisy_accuracy", batch_size=500, max_examples=2000)

  if arg == "tiny":
    c.model.update(block_out_channels=(8, 16), attention_levels=(False, False), norm_num_groups=4,
                   num_attention_heads=2)
    c.data.image_size = 16
    c.train.update(steps=4, batch_size=8, log_every=2, checkpoint_every=2, progress_bar=False, eval_at_end=False)
    c.evals.noisy.update(batch_size=8, max_examples=16)
  return c
