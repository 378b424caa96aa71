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
      layer_decay=1.0,  # d < 1: each transformer layer's lr times d per layer below the head (optimizer.layer_decay)
      clip_weights=0.0))  # c > 0: parameters projected into [-c, c] after every step (WGAN's critic)
  # updates: the names of the task's updates that keep an EMA (e.g. ('generator',)); () = all of them.
  c.ema = ml_collections.ConfigDict(dict(enabled=True, decay=0.999, warmup=True, use_for_eval=True, updates=()))

  c.train = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=64, log_every=50, checkpoint_every=500, keep_checkpoints=3,
      async_checkpoints=True, eval_every=0, sample_every=0, eval_at_end=True, sample_at_end=True,
      progress_bar=True,
      grad_accum_steps=1,  # micro-batches per step (diffusion_jax/train/accumulate.py); batch_size splits evenly
      # the persistent XLA cache: '' = $DIFFUSION_JAX_COMPILATION_CACHE, else ~/.cache/diffusion_jax/xla; 'off'
      compilation_cache_dir="",
      frozen=(),  # regexes of parameter names to freeze on top of the task's frozen parts, e.g. ('vision_model\\.',)
      # A resumed run refuses frozen weights (another run, a folder, a file) that changed since it started; True
      # accepts the change on purpose.
      accept_changed_sources=False,
      max_unreadable_fraction=0.5))  # stop when more of the first steps' examples than this could not be read
  # LoRA fine-tuning of any task (diffusion_jax/train/adapters.py): rank > 0 adds adapters on the linear layers that
  # `targets` names (regexes over dotted module names, or the presets 'attention', 'all-linear') under the submodule
  # `under` ('' = all) and trains only them; `base_workdir`: a finished run of the same task to start from. alpha 0 =
  # rank (scale 1).
  c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=0.0, targets=("attention",), under="", dropout=0.0,
                                          rslora=False, base_workdir=""))
  # Evaluators by name (diffusion_jax/train/evaluators.py): each config adds its own with `evaluator(...)`.
  c.evals = ml_collections.ConfigDict()
  c.data = default_data_config()
  return c


def optimizer(**overrides) -> ml_collections.ConfigDict:
  """An optimizer section like `optim`, for a task's further updates (`c.disc_optim = optimizer(lr=2e-4)`)."""
  section = base_config().optim
  section.update(overrides)
  return section


# The options of each built-in evaluator type (diffusion_jax/evaluators/) at their defaults.
EVALUATOR_OPTIONS = {
    "loss": dict(batches=0, update_name="", key=""),  # batches 0: the whole split; update_name "": the first
    "digit_accuracy": dict(per_class=50, templates=(), heldout=False, key="", seed=1234, guidance_scale=0.0,
                           classifier_cache_dir="", clip_score=False, clip_workdir="", frechet=True, diversity=True,
                           candidates=0),  # candidates > 0: images per prompt a reranking task draws (1: none)  # templates (): the first caption template
    "zero_shot": dict(max_examples=0, templates=()),  # templates (): the caption templates
    "retrieval": dict(max_examples=0),
    "reconstruction": dict(max_examples=0),
    "accuracy": dict(max_examples=0),  # a classifier's held-out top-1 accuracy (0: the whole split)
    "codebook": dict(max_examples=0),  # a VQ autoencoder's code usage and perplexity over the split (0: all)
    "photos": dict(photos=(), crops=5),
    "caption_digit": dict(max_examples=0, heldout=False, seed=0, key="", max_new_tokens=16),
    "vqa": dict(max_examples=0, heldout=True, seed=0, key="", max_new_tokens=8),
    "perplexity": dict(max_examples=0, key=""),
    "prior_health": dict(max_examples=1000, seed=0),
    "variations": dict(max_examples=0, per_image=4, seed=0),  # unCLIP variations of held-out images (0: all)
    "caption_f1": dict(max_examples=0, heldout=False, seed=0, key="", max_new_tokens=16, clip_workdir=""),
    "upsampler": dict(max_examples=256, photos=(), crops=5, seed=0),  # photos (): none (eval.image_metrics names)
    "image_nll": dict(max_examples=0),
    # images generated for the eval split's captions, each caption ranked among them by a CLIP run
    "text_retrieval": dict(clip_workdir="", max_examples=0, seed=0, candidates=0, key=""),  # a DALL-E transformer's image-token NLL given the caption
    "elbo": dict(importance_samples=100, max_examples=0, seed=0),  # a VAE's -ELBO and IWAE bound (nats, bits/dim)
    # a noise-aware classifier's held-out accuracy at these time steps
    # samples of concept.prompt judged by the digit classifier's features against the subject's images
    "concept": dict(prompt="", num_samples=100, seed=1234, guidance_scale=0.0, classifier_cache_dir="", key=""),
    "noisy_accuracy": dict(timesteps=(0, 250, 500, 750, 900), max_examples=0, seed=0),
    # FID/KID against the eval split's images, of samples or of the model's outputs for those images (source), on
    # FID's InceptionV3 (weights at `inception`), the digit judge or a contrastive run's image tower
    "fid": dict(features="inception", inception="", allow_pickle=False, clip_workdir="", source="",
                num_samples=2048, frechet=True, kid=True, precision_recall=False, seed=0, key="",
                guidance_scale=0.0),
}


def evaluator(type: str, every: int = 0, split: str = "", batch_size: int = 0,  # noqa: A002 (the config key)
              **options) -> ml_collections.ConfigDict:
  """A `config.evals` entry: evaluator `type` with its options (the others at `EVALUATOR_OPTIONS`' defaults).
  every: 0 = every train.eval_every steps (if set), at the end and in --mode eval; N = also every N steps; -1 = never.
  split '' = data.eval_split; batch_size 0 = train.batch_size."""
  entry = dict(type=type, every=every, split=split, batch_size=batch_size, **EVALUATOR_OPTIONS.get(type, {}))
  entry.update(options)
  return ml_collections.ConfigDict(entry)


def diffusion_config() -> ml_collections.ConfigDict:
  """Every option of the diffusion task (diffusion_jax/tasks/diffusion.py) at its default; configs override."""
  c = base_config()
  c.task = "diffusion"
  c.model = ml_collections.ConfigDict(dict(
      denoiser="unet",  # 'unet' | 'dit'
      conditioners=("text",),  # any of 'text' (trained encoder), 'clip_text' (text.clip_workdir), 'class',
      # 'clip_image' (the image tower of text.clip_workdir, with 'clip_text': unCLIP's decoder)
      num_classes=0,  # > 0 with the 'class' conditioner; the null class is num_classes
      # U-Net (diffusers UNet2DConditionModel fields)
      block_out_channels=(16, 32, 64), layers_per_block=1, attention_levels=(False, False, True),
      mid_block_attention=True, num_attention_heads=4, transformer_layers_per_block=1, use_linear_projection=True,
      norm_num_groups=8, resnet_time_scale_shift="scale_shift", use_pooled_text=True,
      # DiT: a named variant, the non-zero fields override it
      variant="small/4", patch_size=0, hidden_size=0, depth=0, num_heads=0, mlp_ratio=4.0,
      dit_text_conditioning="cross_attention",  # or 'joint_attention'
      # the trained caption encoder of the 'text' conditioner
      text_width=64, text_layers=2, text_heads=4,
      image_context_tokens=4,  # with 'clip_image': context tokens the image embedding is projected into (unCLIP)
      compute_dtype="float32", attention_impl="", remat="none"))
  c.diffusion = ml_collections.ConfigDict(dict(
      objective="diffusion",  # 'diffusion' | 'flow' (rectified flow)
      schedule="cosine", num_timesteps=1000, beta_start=1e-4, beta_end=2e-2, prediction_type="v_prediction",
      cond_drop_prob=0.1,  # the share of rows whose conditions are dropped (classifier-free guidance)
      image_drop_prob=0.1,  # with 'clip_image': the share whose image embedding is dropped (on its own)
      time_sampling="uniform", logit_mean=0.0, logit_std=1.0,  # or 'logit_normal' training steps
      snr_gamma=0.0))  # > 0: Min-SNR-γ loss weighting
  c.flow = ml_collections.ConfigDict(dict(
      time_sampling="logit_normal", logit_mean=0.0, logit_std=1.0,
      # task='reflow': a finished flow run whose guided samples the model retrains on (diffusion_jax/tasks/reflow.py)
      reflow=dict(teacher_workdir="", num_pairs=2048, teacher_steps=20, guidance_scale=1.0, seed=0)))
  c.sample = ml_collections.ConfigDict(dict(
      sampler="ddpm", num_steps=100, eta=0.0, use_karras_sigmas=False, shift=1.0, clip_x0=True,
      guidance_scale=3.0, guidance_rescale=0.0, negative_prompt="",
      prompts=(), per_prompt=8, seed=0, batch_size=100,
      template="",  # '' = the first caption template; prompts for the per-class grid when `prompts` is empty
      # Gradient guides (diffusion_jax/tasks/guides.py), for ddim/ddpm/dpmpp_2m on pixels: a finished
      # noisy_classifier run steering each sample to its class, a finished contrastive run steering the predicted
      # x_0 to its prompt (`cutouts` random crops per step, 0: the whole image; `through_model`: differentiate x_0
      # through the denoiser, one more backward pass per step).
      classifier_guidance=dict(workdir="", scale=0.0),
      clip_guidance=dict(workdir="", scale=0.0, cutouts=0, through_model=False)))
  # Latent diffusion (diffusion_jax/tasks/latent.py): a frozen VAE from a finished run or a diffusers folder.
  c.latent = ml_collections.ConfigDict(dict(
      vae_workdir="", vae_pretrained="", scaling_factor=0.0, cache=False, cache_dir="", cache_batch_size=256,
      shard_size=10000, scale_examples=2048))
  c.text = ml_collections.ConfigDict(dict(clip_workdir=""))  # the contrastive run of the 'clip_text' conditioner
  # task='concept' (diffusion_jax/tasks/concept.py): DreamBooth on a finished run (lora.base_workdir)
  c.concept = ml_collections.ConfigDict(dict(
      images="",  # a folder of the subject's images ('' = the bundled hand-drawn stars)
      prompt="",  # the prompt naming it by a rare word, e.g. 'a handwritten digit sks'
      class_prompt="",  # the prior: a prompt or a template over data.class_names ('' = no prior preservation)
      num_class_images=200, prior_loss_weight=1.0, seed=0))
  # task='upsampler' (diffusion_jax/tasks/upsampler.py): the 'low_res' conditioner's image and its corruption
  c.upsample = ml_collections.ConfigDict(dict(
      low_res_size=0,  # the size of the images it upsamples (to data.image_size)
      augment="blur",  # in training: 'blur' | 'noise' | 'none' (see models.conditioners.LowResConditioner)
      blur_sigma=(0.4, 0.6),  # 'blur': the range σ is drawn from, in low-res pixels
      noise_level_max=250,  # 'noise': the highest level, in steps of diffusion.schedule
      sample_noise_level=20,  # 'noise': the fixed level the image to upsample is noised to in sampling
      sample_images=16))  # --mode sample: held-out images of the eval split to upsample
  c.evals.loss = evaluator("loss", batch_size=256, batches=4)
  c.evals.digits = evaluator("digit_accuracy", per_class=50)
  return c


def tiny_diffusion_run(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a diffusion config's loop, sampling and evaluation to the seconds-long `:tiny` run of the tests:
  4 steps of 8 images at 16 px, a checkpoint every 2 steps, 4-step sampling, no end-of-run evaluation or sampling.
  The config's own `tiny` block shrinks its model."""
  c.data.image_size = 16
  c.train.update(steps=4, batch_size=8, log_every=2, checkpoint_every=2, progress_bar=False, eval_at_end=False,
                 sample_at_end=False)
  c.sample.update(num_steps=4, per_prompt=1, batch_size=10)
  c.evals.loss.update(batch_size=8, batches=1)
  c.evals.digits.every = -1
  return c
