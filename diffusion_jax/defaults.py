"""Defaults shared by every config (mesh, sharding strategy, optimizer, EMA, loop intervals, data), and the
seconds-long test variant of the diffusion configs.

They live in the package, not next to the config files, so that a config copied anywhere, or loaded from any
working directory, imports them from the installed library: `from diffusion_jax.defaults import base_config`.
(Not in `diffusion_jax.config`: that module sits below `parallel/` and `data/`, which raise its ConfigError, and
these defaults import from both.)
"""
import ml_collections

from diffusion_jax.data.pipeline import default_data_config
from diffusion_jax.parallel.strategies import DEFAULT_MIN_SHARDED_SIZE


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = ""
  c.seed = 0

  # Multi-controller JAX. On Cloud TPU VMs `enabled=True` is enough; elsewhere give the coordinator.
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=1, process_id=0, local_device_count=0))
  c.mesh = ml_collections.ConfigDict(dict(axes=("data", "fsdp", "tensor"), shape=(-1, 1, 1)))
  # strategy: 'data' | 'fsdp' | 'tensor' | 'fsdp_tensor', a preset of logical-axis → mesh-axis rules; `rules` are
  # (logical name, mesh axes) pairs replacing the preset's entry of that name (docs/scaling.md). Under FSDP a
  # parameter of min_sharded_size elements or more left replicated is an error (0: no check).
  c.sharding = ml_collections.ConfigDict(dict(strategy="data", rules=(), min_sharded_size=DEFAULT_MIN_SHARDED_SIZE))

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, schedule="cosine", warmup_steps=100, end_lr_factor=0.0,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0,
      frozen=()))  # regexes of parameter names left untouched, e.g. ('vision_model\\.',)
  c.ema = ml_collections.ConfigDict(dict(enabled=True, decay=0.999, warmup=True, use_for_eval=True))

  c.train = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=64, log_every=50, checkpoint_every=500, keep_checkpoints=3,
      async_checkpoints=True, eval_every=0, sample_every=0, eval_at_end=True, sample_at_end=True,
      progress_bar=True,
      grad_accum_steps=1,  # micro-batches per step (diffusion_jax/train/accumulate.py); batch_size splits evenly
      compilation_cache_dir=""))  # persistent XLA cache; '' reads $DIFFUSION_JAX_COMPILATION_CACHE, unset: off
  c.data = default_data_config()
  return c


def tiny_diffusion_run(c: ml_collections.ConfigDict) -> None:
  """Shrinks a pixel-diffusion config's loop, sampling and evaluation to the seconds-long `:tiny` run of the tests:
  4 steps of 8 images at 16 px, a checkpoint every 2 steps, 4-step sampling, no end-of-run evaluation or sampling.
  The config's own `tiny` block shrinks its model."""
  c.data.image_size = 16
  c.train.update(steps=4, batch_size=8, log_every=2, checkpoint_every=2, progress_bar=False, eval_at_end=False,
                 sample_at_end=False)
  c.sample.update(num_steps=4, per_prompt=1, batch_size=10)
  c.eval.update(batch_size=8, loss_batches=1, digit_accuracy_samples_per_class=0)
