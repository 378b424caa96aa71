"""Caption-conditioned pixel DDPM on bundled MNIST: the embedded default, trains on a 2-core CPU.

  python -m diffusion_jax.main --config configs/mnist_ddpm.py --workdir /tmp/mnist_ddpm

`--config configs/mnist_ddpm.py:tiny` is a seconds-long variant used by the tests.
"""
import ml_collections

from diffusion_jax.defaults import base_config, tiny_diffusion_run


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = base_config()
  c.task = "text_to_image_diffusion"

  c.model = ml_collections.ConfigDict(dict(
      block_out_channels=(16, 32, 64), layers_per_block=1, attention_levels=(False, False, True),
      mid_block_attention=True, num_attention_heads=4, transformer_layers_per_block=1, use_linear_projection=True,
      norm_num_groups=8, resnet_time_scale_shift="scale_shift", text_width=64, text_layers=2, text_heads=4, use_pooled_text=True, num_classes=0,
      compute_dtype="float32", attention_impl="", remat="none"))
  c.diffusion = ml_collections.ConfigDict(dict(
      schedule="cosine", num_timesteps=1000, beta_start=1e-4, beta_end=2e-2, prediction_type="v_prediction",
      cond_drop_prob=0.1, snr_gamma=0.0))  # snr_gamma > 0: Min-SNR-γ loss weighting
  c.sample = ml_collections.ConfigDict(dict(
      sampler="ddpm", num_steps=100, eta=0.0, guidance_scale=3.0, guidance_rescale=0.0,
      prompts=(), per_prompt=8, seed=0, batch_size=100,
      template=""))  # '' = the first caption template; prompts for the per-digit grid when `prompts` is empty
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=256, loss_batches=4, digit_accuracy_samples_per_class=50, classifier_cache_dir="",
      heldout_templates=()))  # caption templates training never used: eval/digit_accuracy_heldout

  c.data.image_size = 28
  c.data.tokenizer = "words"  # one token per word: a from-scratch text tower need not learn to spell
  c.data.max_text_len = 16
  c.ema.decay = 0.995
  c.train.steps = 1700
  c.train.batch_size = 64
  c.train.log_every = 100
  c.train.checkpoint_every = 1000
  c.train.eval_every = 0  # evaluation and sampling run at the end (train.eval_at_end, train.sample_at_end)
  c.train.sample_every = 0
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 200

  if arg == "tiny":
    c.model.block_out_channels = (8, 16)
    c.model.attention_levels = (False, True)
    c.model.num_attention_heads = 2
    c.model.norm_num_groups = 4
    c.model.text_width = 16
    c.model.text_layers = 1
    c.model.text_heads = 2
    c.data.max_text_len = 32
    tiny_diffusion_run(c)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; use '' or 'tiny'")
  return c
