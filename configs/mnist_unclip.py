"""unCLIP (DALL-E 2) on bundled MNIST: a prior (diffusion or autoregressive) and a pixel decoder in the space of a
`mnist_clip` run.

  python -m diffusion_jax.main --config configs/mnist_clip.py --workdir /tmp/mnist_clip          # the CLIP
  python -m diffusion_jax.main --config configs/mnist_unclip.py:prior --workdir /tmp/unclip_prior \\
      --config.text.clip_workdir=/tmp/mnist_clip                                                  # caption → image emb.
  python -m diffusion_jax.main --config configs/mnist_unclip.py --workdir /tmp/unclip_decoder \\
      --config.text.clip_workdir=/tmp/mnist_clip --config.unclip.prior_workdir=/tmp/unclip_prior  # image emb. → image

The paper's other prior, autoregressive over PCA-reduced, bucketed embeddings (`:ar_prior`), takes the diffusion
prior's place anywhere (`--config.unclip.prior_workdir=/tmp/unclip_ar_prior`):
  python -m diffusion_jax.main --config configs/mnist_unclip.py:ar_prior --workdir /tmp/unclip_ar_prior \\
      --config.text.clip_workdir=/tmp/mnist_clip

The decoder trains without the prior (on the image tower's embeddings of the training digits); the prior is restored
frozen into it for text → image sampling and for the end-of-run evaluation: 50 samples per digit through the whole
chain, judged by the independent MNIST classifier (eval/digit_accuracy). The design documents' ablation decodes the
caption alone (`--config.unclip.image_embedding=zero`), the CLIP text embedding (`=text`) or the prior's (`=prior`):
  python -m diffusion_jax.main --config configs/mnist_unclip.py --workdir /tmp/unclip_decoder --mode eval \\
      --config.text.clip_workdir=/tmp/mnist_clip --config.unclip.prior_workdir=/tmp/unclip_prior \\
      --config.unclip.image_embedding=text
Variations of image files: `--mode sample --config.sample.variations_of='("a.png", "b.png")'`; an interpolation
strip between two: `--config.sample.interpolate='("a.png", "b.png")'`; a text diff of an image from its caption towards
another: `--config.sample.text_diff='("a.png", "a handwritten digit one", "a handwritten digit seven")'`.

`:prior,tiny`, `:ar_prior,tiny` and `:tiny` are seconds-long variants for the tests.
"""
import ml_collections

from diffusion_jax.defaults import base_config, diffusion_config, evaluator, tiny_diffusion_run

TEMPLATES = ("a handwritten digit {name}",)


def unclip_section() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # how the prior is sampled (by the prior run's evaluation, and by the decoder's text → image chain)
      sampler="ddim", num_steps=25, guidance_scale=2.0, candidates=2,
      stats_examples=10000,  # the prior run: training images its embedding statistics are estimated from
      # the decoder: the prior run, and where the image embedding comes from ('prior', 'text', 'zero')
      prior_workdir="", image_embedding="prior",
      upsampler_workdirs=()))  # the decoder: finished upsampler runs applied in order (configs/mnist_upsampler.py)


def prior_config(tiny: bool) -> ml_collections.ConfigDict:
  c = base_config()
  c.task = "unclip_prior"
  c.model = ml_collections.ConfigDict(dict(num_heads=4, head_dim=32, layers=4, compute_dtype="float32",
                                           attention_impl=""))
  c.diffusion = ml_collections.ConfigDict(dict(schedule="cosine", num_timesteps=1000, beta_start=1e-4,
                                               beta_end=2e-2, cond_drop_prob=0.1))
  c.text = ml_collections.ConfigDict(dict(clip_workdir=""))
  c.unclip = unclip_section()
  c.sample = ml_collections.ConfigDict(dict(prompts=(), per_prompt=8, seed=0))
  c.evals.health = evaluator("prior_health", batch_size=500, max_examples=1000)
  c.data.image_size = 28
  c.data.caption_templates = TEMPLATES
  c.data.tokenizer = "words"
  c.data.max_text_len = 16  # configs/mnist_clip.py's
  c.optim.update(lr=1e-3, warmup_steps=100, weight_decay=0.0)
  c.ema.decay = 0.995
  c.train.update(steps=1000, batch_size=128, log_every=100, checkpoint_every=500)
  if tiny:
    c.model.update(num_heads=2, head_dim=8, layers=1)
    c.unclip.update(num_steps=3, stats_examples=64)
    c.evals.health.update(batch_size=16, max_examples=16)
    c.sample.per_prompt = 1
    c.train.update(steps=2, batch_size=16, log_every=1, checkpoint_every=2, progress_bar=False)
  return c


def ar_prior_config(tiny: bool) -> ml_collections.ConfigDict:
  c = prior_config(tiny)
  c.task = "unclip_ar_prior"
  del c.diffusion
  # The paper's 319 of 1024 components and 1024 buckets, scaled to the 64-d MNIST CLIP.
  c.ar_prior = ml_collections.ConfigDict(dict(components=16, bins=64, text_prefix=1, cond_drop_prob=0.1,
                                              temperature=1.0))
  c.unclip = ml_collections.ConfigDict(dict(guidance_scale=2.0, candidates=2, stats_examples=10000))
  c.model = ml_collections.ConfigDict(dict(width=128, layers=4, heads=4, mlp_dim=512, compute_dtype="float32",
                                           attention_impl=""))
  c.optim.warmup_steps = 50
  if not tiny:  # (prior_config's tiny block has shrunk the loop already)
    c.train.update(steps=400, checkpoint_every=200)  # 9 min on 2 busy CPU cores; the frozen image tower dominates
  else:
    c.ar_prior.update(components=4, bins=8)
    c.unclip.stats_examples = 64
    c.model.update(width=16, layers=1, heads=2, mlp_dim=32)
  return c


def decoder_config(tiny: bool) -> ml_collections.ConfigDict:
  c = diffusion_config()
  c.task = "unclip_decoder"
  # The image embedding becomes 4 context tokens before the caption's 16 token states, cross-attended at 7×7.
  c.model.update(conditioners=("clip_text", "clip_image"), block_out_channels=(16, 32, 64),
                 attention_levels=(False, False, True), image_context_tokens=4)
  c.evals.digits.clip_score = True  # also CLIP score, by the decoder's own frozen towers
  c.diffusion.update(cond_drop_prob=0.5, image_drop_prob=0.1)  # DALL-E 2: caption dropped 50%, embedding 10%
  c.unclip = unclip_section()
  c.sample.update(sampler="dpmpp_2m", num_steps=25, guidance_scale=3.0, per_prompt=8, batch_size=100,
                  variations_of=(), variations_heldout=0, interpolate=(), text_diff=(), text_diff_max=0.5)
  c.data.image_size = 28
  c.data.caption_templates = TEMPLATES
  c.data.tokenizer = "words"
  c.data.max_text_len = 16
  c.ema.decay = 0.995
  c.optim.update(lr=2e-3, warmup_steps=200)
  c.train.update(steps=1200, batch_size=64, log_every=100, checkpoint_every=600)
  if tiny:
    c.model.update(block_out_channels=(8, 16), attention_levels=(False, True), num_attention_heads=2,
                   norm_num_groups=4)
    tiny_diffusion_run(c)
    c.data.image_size = 28  # the CLIP tower's patches need the MNIST size
    c.evals.digits.update(per_class=1, diversity=False)
  return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  stage, _, size = arg.partition(",")
  if stage == "tiny" and not size:
    stage, size = "", "tiny"
  stages = {"": decoder_config, "prior": prior_config, "ar_prior": ar_prior_config}
  if stage not in stages or size not in ("", "tiny"):
    raise ValueError(f"unknown config argument {arg!r}; use '', 'prior' or 'ar_prior', each optionally with ',tiny'")
  return stages[stage](size == "tiny")
