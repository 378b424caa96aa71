"""Diffusion on the trainer: a U-Net or DiT denoiser, its conditioners, optionally a frozen VAE's latent space; the
DDPM objective or a rectified flow; classifier-free-guided sampling with any sampler.

Config (the defaults are `diffusion_jax/defaults.py: diffusion_config`):
  model.denoiser       'unet' or 'dit' (`model.variant`, e.g. 'S/4', with per-field overrides).
  model.conditioners   names of conditioners (`models.conditioners`) whose entries make the denoiser's `cond`:
                       'text' a caption encoder trained with the denoiser; 'clip_text' the frozen text tower of a
                       finished contrastive run (`text.clip_workdir`); 'class' the class label (`model.num_classes`);
                       'clip_image' (with 'clip_text') the frozen image tower's embedding of the image, which unCLIP's
                       decoder learns to invert (`tasks.unclip_decoder`), dropped on its own at
                       `diffusion.image_drop_prob`; 'low_res' the image to upsample (`upsample.*`, task='upsampler',
                       `tasks.upsampler`), concatenated to the U-Net's input.
  diffusion.objective  'diffusion' (`diffusion.prediction_type`) or 'flow' (rectified flow, the velocity noise - x_0,
                       `flow.time_sampling`; sampled with `sample.sampler='flow_euler'`).
  latent.*             latent diffusion (`tasks.latent`): the denoiser sees a frozen VAE's latents.

Classifier-free guidance is learned by dropping every condition of a fraction (`diffusion.cond_drop_prob`) of the
rows to its unconditional form (the empty caption, the null class); sampling runs the conditional and the
unconditional (or negative-prompt) halves in one batched call. Evaluation is by `config.evals` (e.g. the
`loss` and `digit_accuracy` evaluators).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from diffusion_jax.config import ConfigError, compute_dtype
from diffusion_jax.data import latent_cache, pipeline, tokenizers
from diffusion_jax.diffusion import flow, objectives, samplers
from diffusion_jax.diffusion.schedules import NoiseSchedule
from diffusion_jax.eval import image_io
from diffusion_jax.models import conditioners as cond_lib, remat
from diffusion_jax.models.clip import CLIPTextModelWithProjection, CLIPVisionModelWithProjection
from diffusion_jax.models.denoiser import DiffusionModel, DiTDenoiser, UNetDenoiser
from diffusion_jax.models.dit import DiTConfig, dit_config
from diffusion_jax.models.unclip import UnCLIPTextProjConfig, UnCLIPTextProjModel
from diffusion_jax.models.text import TextEncoderConfig
from diffusion_jax.models.unet import UNetConfig
from diffusion_jax.models.vae import AutoencoderKL
from diffusion_jax.parallel import host
from diffusion_jax.tasks import clip_towers, guides as guides_lib
from diffusion_jax.tasks.latent import LatentSpace, identity
from diffusion_jax.train import parts, runs
from diffusion_jax.train.evaluators import split_outputs
from diffusion_jax.train.task import ModelContext, Task, register

DENOISERS = ("unet", "dit")
OBJECTIVES = ("diffusion", "flow")
CONDITIONERS = ("text", "clip_text", "clip_image", "class", "low_res")


def dit_model_config(config, *, shape, text_dims) -> DiTConfig:
  """`model.variant` (e.g. 'S/4') with `patch_size`, `hidden_size`, `depth`, `num_heads` overriding it when > 0;
  `shape` (size, size, channels) of what is denoised, `text_dims` (token width, pooled width) or None."""
  m = config.model
  overrides = {k: int(m[k]) for k in ("patch_size", "hidden_size", "depth", "num_heads") if m[k]}
  size, _, channels = shape
  try:
    return dit_config(
        m.variant, **overrides, input_size=size, in_channels=channels, learn_sigma=False, mlp_ratio=float(m.mlp_ratio),
        num_classes=m.num_classes, context_dim=text_dims[0] if text_dims else 0,
        conditioning=m.dit_text_conditioning, dtype=compute_dtype(m.compute_dtype),
        attention_impl=m.attention_impl or None, remat=remat.from_config(m))
  except ValueError as e:
    raise ConfigError(str(e)) from e


def unet_config(config, *, channels: int, text_dims, image_embedding: bool = False) -> UNetConfig:
  """The U-Net of `config.model`; `channels` of what is denoised, `text_dims` as in `dit_model_config`. With an
  `image_embedding` (unCLIP's decoder) the pooled input takes the image embedding's time-embedding addition."""
  m = config.model
  if image_embedding:
    pooled_dim = 4 * m.block_out_channels[0]  # the U-Net's time-embedding width
  else:
    pooled_dim = text_dims[1] if text_dims and m.use_pooled_text else 0
  return UNetConfig(
      in_channels=channels, out_channels=channels, block_out_channels=tuple(m.block_out_channels),
      layers_per_block=m.layers_per_block, attention_levels=tuple(m.attention_levels),
      mid_block_attention=m.mid_block_attention, num_attention_heads=m.num_attention_heads,
      cross_attention_dim=text_dims[0] if text_dims else None,
      transformer_layers_per_block=m.transformer_layers_per_block, use_linear_projection=m.use_linear_projection,
      norm_num_groups=m.norm_num_groups, num_class_embeds=m.num_classes,
      pooled_dim=pooled_dim,
      resnet_time_scale_shift=m.resnet_time_scale_shift, dtype=compute_dtype(m.compute_dtype),
      attention_impl=m.attention_impl or None, remat=remat.from_config(m))


def text_config(config, tokenizer) -> TextEncoderConfig:
  m = config.model
  return TextEncoderConfig(vocab_size=tokenizer.vocab_size, max_len=config.data.max_text_len, width=m.text_width,
                           layers=m.text_layers, heads=m.text_heads, pad_id=tokenizer.pad_id,
                           dtype=compute_dtype(m.compute_dtype), remat=remat.from_config(m))


def sampler_options(sample_cfg, sampler: str) -> dict:
  """The `samplers.sample` options of `sample_cfg` that `sampler` takes (it refuses the others)."""
  taken = samplers.SAMPLERS[sampler].options
  wanted = {"eta": sample_cfg.eta, "use_karras_sigmas": sample_cfg.use_karras_sigmas, "shift": sample_cfg.shift}
  return {k: v for k, v in wanted.items() if k in taken}


def _choice(value, allowed, what):
  if value not in allowed:
    raise ConfigError(f"{what} must be one of {allowed}, got {value!r}")
  return value


@register("diffusion", "text_to_image_diffusion")
class DiffusionTask(Task):
  retrains_a_teacher = False  # see tasks.reflow
  upsamples = False  # see tasks.upsampler

  def __init__(self, config):
    super().__init__(config)
    m, d, s = config.model, config.diffusion, config.sample
    if config.flow.reflow.teacher_workdir and not self.retrains_a_teacher:
      raise ConfigError(f"flow.reflow.teacher_workdir is set but task={config.task!r}: a reflow is task='reflow' "
                        "(e.g. configs/mnist_dit.py:reflow)")
    self.denoiser = _choice(m.denoiser, DENOISERS, "model.denoiser")
    self.objective = _choice(d.objective, OBJECTIVES, "diffusion.objective")
    self.conditioner_names = tuple(m.conditioners)
    for name in self.conditioner_names:
      _choice(name, CONDITIONERS, "each of model.conditioners")
    if "text" in self.conditioner_names and "clip_text" in self.conditioner_names:
      raise ConfigError("model.conditioners: 'text' and 'clip_text' both give the text states; choose one")
    if "clip_image" in self.conditioner_names and ("clip_text" not in self.conditioner_names
                                                    or m.denoiser != "unet"):
      raise ConfigError("model.conditioners: 'clip_image' (unCLIP's decoder) goes with 'clip_text' of the same CLIP "
                        "run and model.denoiser='unet'")
    if "low_res" in self.conditioner_names and not self.upsamples:
      raise ConfigError(f"model.conditioners: 'low_res' makes an upsampler, task='upsampler' (e.g. "
                        f"configs/mnist_upsampler.py), not task={config.task!r}")
    if ("class" in self.conditioner_names) != bool(m.num_classes):
      raise ConfigError(f"model.conditioners={self.conditioner_names} and model.num_classes={m.num_classes}: the "
                        "'class' conditioner goes with num_classes > 0")
    self.tokenizer = tokenizers.get_tokenizer(config.data.tokenizer)
    self.null_tokens = self.tokenizer([""], config.data.max_text_len)[0]
    self.schedule = NoiseSchedule.create(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)
    # A flow model predicts the velocity noise - x_0 whatever diffusion.prediction_type says.
    self.prediction_type = samplers.FLOW_PREDICTION if self.objective == "flow" else d.prediction_type
    _choice(s.sampler, tuple(samplers.SAMPLERS), "sample.sampler")
    if self.prediction_type not in samplers.SAMPLERS[s.sampler].prediction_types:
      raise ConfigError(f"sample.sampler={s.sampler!r} cannot sample a {self.objective!r} model "
                        f"(prediction_type {self.prediction_type!r})"
                        + ("; use 'flow_euler'" if self.objective == "flow" else ""))
    _choice(config.flow.time_sampling, flow.TIME_SAMPLINGS, "flow.time_sampling")
    _choice(d.time_sampling, flow.TIME_SAMPLINGS, "diffusion.time_sampling")
    self.latents = LatentSpace(config) if LatentSpace.wanted(config) else None
    if config.latent.cache and self.latents is None:
      raise ConfigError("latent.cache=True needs a VAE and neither latent.vae_workdir (a finished autoencoder run) "
                        "nor latent.vae_pretrained (a diffusers vae/ folder) is set")
    self.shape = self.latents.shape if self.latents else (config.data.image_size,) * 2 + (config.data.channels,)
    self.text_source = self._text_source()
    self.image_source = (clip_towers.run_source("text.clip_workdir", config.text.clip_workdir, ("image",),
                                                target="conditioners.clip_image.tower", data=config.data)
                         if "clip_image" in self.conditioner_names else None)
    self.guides = guides_lib.from_config(config, self.schedule, s.sampler)
    if self.guides and self.latents is not None:
      raise ConfigError("sample.classifier_guidance / clip_guidance guide pixel-space runs; this one samples latents")

  def _text_source(self) -> Optional[runs.RunSource]:
    workdir = self.config.text.clip_workdir
    if "clip_text" not in self.conditioner_names:
      if workdir:
        raise ConfigError("text.clip_workdir is set but model.conditioners does not name 'clip_text'")
      return None
    if not workdir:
      raise ConfigError("the 'clip_text' conditioner needs text.clip_workdir, a finished contrastive run")
    return clip_towers.run_source("text.clip_workdir", workdir, ("text",), target="conditioners.clip_text.tower",
                                  data=self.config.data)

  # ------------------------------------------------------------------ the model
  def _conditioners(self, rngs: nnx.Rngs) -> dict:
    out = {}
    for name in self.conditioner_names:
      if name == "text":
        out[name] = cond_lib.TextConditioner(text_config(self.config, self.tokenizer), self.null_tokens, rngs=rngs)
      elif name == "clip_text":
        clip = self.text_source.task().model_config
        tower = CLIPTextModelWithProjection(clip.text, clip.embed_dim, rngs=rngs)
        out[name] = cond_lib.FrozenTextConditioner(tower, self.null_tokens)
      elif name == "clip_image":
        clip = self.image_source.task().model_config
        tower = CLIPVisionModelWithProjection(clip.vision, clip.embed_dim, rngs=rngs)
        out[name] = cond_lib.ImageEmbeddingConditioner(
            tower, self.image_source.config().model.pixel_normalization)
      elif name == "low_res":
        out[name] = self.low_res_conditioner()
      else:
        out[name] = cond_lib.ClassConditioner(self.config.model.num_classes)
    return out

  def low_res_conditioner(self) -> cond_lib.LowResConditioner:
    """The 'low_res' conditioner of `upsample.*`; noise levels are those of this task's schedule."""
    u = self.config.upsample
    signal = np.asarray(self.schedule.sqrt_alphas_cumprod)[:int(u.noise_level_max)]
    try:
      return cond_lib.LowResConditioner(
          int(u.low_res_size), int(self.config.data.channels), u.augment, blur_sigma=tuple(u.blur_sigma),
          noise_signal=(1.0, *(float(x) for x in signal)), sample_noise_level=int(u.sample_noise_level))
    except ValueError as e:
      raise ConfigError(f"upsample.augment: {e}") from None

  def text_dims(self) -> Optional[tuple[int, int]]:
    """(token width, pooled width) of the text conditioner, None without one."""
    if "text" in self.conditioner_names:
      return (self.config.model.text_width,) * 2
    if "clip_text" in self.conditioner_names:
      clip = self.text_source.task().model_config
      return clip.text.width, clip.embed_dim
    return None

  def denoiser_config(self) -> UNetConfig | DiTConfig:
    if self.denoiser == "dit":
      return dit_model_config(self.config, shape=self.shape, text_dims=self.text_dims())
    cfg = unet_config(self.config, channels=self.shape[-1], text_dims=self.text_dims(),
                      image_embedding=self.image_source is not None)
    if "low_res" in self.conditioner_names:  # x_t and the upsampled image; the noise level as the class label
      cfg = dataclasses.replace(cfg, in_channels=2 * cfg.in_channels,
                                num_class_embeds=self.low_res_conditioner().noise_levels)
    return cfg

  def text_proj(self, cfg: UNetConfig, rngs: nnx.Rngs) -> Optional[UnCLIPTextProjModel]:
    """unCLIP's image-embedding projection in front of the U-Net (None without the 'clip_image' conditioner)."""
    if self.image_source is None:
      return None
    clip = self.image_source.task().model_config
    if clip.text.width != clip.embed_dim:
      raise ConfigError(f"'clip_image' needs the CLIP run's text width ({clip.text.width}) to equal its embed_dim "
                        f"({clip.embed_dim}): unCLIP's text projection maps token states with one layer of that size")
    return UnCLIPTextProjModel(UnCLIPTextProjConfig(
        time_embed_dim=cfg.temb_dim, cross_attention_dim=cfg.cross_attention_dim,
        clip_extra_context_tokens=int(self.config.model.image_context_tokens), clip_embeddings_dim=clip.embed_dim,
        dtype=cfg.dtype), rngs=rngs)

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    conditioners = self._conditioners(rngs)
    cfg = self.denoiser_config()
    if self.denoiser == "dit":
      denoiser = DiTDenoiser(cfg, rngs=rngs)
    else:
      denoiser = UNetDenoiser(cfg, rngs=rngs, text_proj=self.text_proj(cfg, rngs))
    vae = AutoencoderKL(self.latents.vae_config, rngs=rngs) if self.latents else None
    return DiffusionModel(denoiser, conditioners, vae, guide={g.name: g.build(rngs) for g in self.guides})

  def frozen(self):
    return parts.under("vae", "conditioners.clip_text", "conditioners.clip_image", "guide")

  def weight_sources(self):
    sources = (self.latents and self.latents.source, self.text_source, self.image_source)
    return [s for s in sources if s is not None] + [g.source for g in self.guides]

  # ------------------------------------------------------------------ data
  def _text_tower(self) -> Optional[dict]:
    """The frozen text tower's identity, which a latent cache records (None: no tower)."""
    return identity(self.text_source) if self.text_source is not None else None

  def check_run(self) -> None:
    super().check_run()
    if self.latents is not None and self.config.latent.cache and self.config.latent.cache_dir:
      # A shared cache made with other settings is refused before anything is compiled.
      latent_cache.check_settings(self.config.latent.cache_dir, self.latents.cache_settings(self._text_tower()))

  def prepare(self, ctx: ModelContext, *, training: bool) -> None:
    if self.latents is not None:
      self.latents.prepare(ctx, training=training, text_tower=self._text_tower(), seed=int(self.config.seed))

  def train_dataset(self, ctx: ModelContext, *, global_batch_size: int, seed: int):
    if self.latents is not None and self.config.latent.cache:
      return self.latents.cached_dataset(global_batch_size=global_batch_size, seed=seed, workdir=ctx.workdir)
    return super().train_dataset(ctx, global_batch_size=global_batch_size, seed=seed)

  def clean_sample(self, model, batch) -> jax.Array:
    """What the model learns to generate: pixels, or the VAE's scaled latents (cached, or encoded here)."""
    if self.latents is None:
      return batch["image"]
    if "latents" in batch:
      return batch["latents"]
    z = model.vae.encode(batch["image"]).mean.astype(jnp.float32)
    return (z - self.latents.shift) * self.latents.scale

  # ------------------------------------------------------------------ training
  def loss(self, model, batch, rng):
    d = self.config.diffusion
    rng_drop, rng_diff = jax.random.split(rng)
    x0 = self.clean_sample(model, batch)
    if "low_res" in self.conditioner_names:  # the upsampler's corrupted conditioning image (own stream)
      batch = dict(batch, **model.conditioners["low_res"].draw(jax.random.fold_in(rng, 1), x0.shape[0],
                                                               training=True))
    cond = model.condition(batch, self.draw_drops(rng_drop, x0.shape[0]))
    model_fn = lambda x_t, t: model(x_t, t, cond)
    if self.objective == "flow":
      # Reflow batches carry the noise each x_0 was sampled from; plain batches draw fresh noise.
      f = self.config.flow
      loss, aux = flow.flow_matching_loss(model_fn, x0, rng_diff, weights=self.row_weights(batch),
                                          noise=batch.get("noise"),
                                          num_train_timesteps=d.num_timesteps, time_sampling=f.time_sampling,
                                          logit_mean=float(f.logit_mean), logit_std=float(f.logit_std))
    else:
      loss, aux = objectives.diffusion_loss(model_fn, self.schedule, x0, rng_diff, prediction_type=d.prediction_type,
                                            weights=self.row_weights(batch), snr_gamma=float(d.snr_gamma),
                                            time_sampling=d.time_sampling, logit_mean=float(d.logit_mean),
                                            logit_std=float(d.logit_std))
    metrics = {"count/skipped_examples": jnp.sum(1.0 - batch["valid"])}
    metrics.update({k: v for k, v in aux.items() if jnp.ndim(v) == 0})
    return loss, metrics

  def row_weights(self, batch) -> jax.Array:
    """Each row's weight in the loss: 1 for a readable example, 0 for one that could not be read."""
    return batch["valid"]

  def draw_drops(self, rng: jax.Array, batch: int) -> dict[str, jax.Array]:
    """Which rows lose their conditions: every conditioner together at `diffusion.cond_drop_prob`, except the image
    embedding, dropped on its own at `diffusion.image_drop_prob` (DALL-E 2's decoder: image 10%, caption 50%)."""
    d = self.config.diffusion
    rng_all, rng_image = jax.random.split(rng)
    shared = jax.random.bernoulli(rng_all, d.cond_drop_prob, (batch,))
    drops = {name: shared for name in self.conditioner_names}
    if "clip_image" in drops:
      drops["clip_image"] = jax.random.bernoulli(rng_image, d.image_drop_prob, (batch,))
    return drops

  # ------------------------------------------------------------------ sampling
  def guided_model_fn(self, model, inputs: dict, uninputs: dict, guidance_scale: float):
    """`(x, t) -> guided output`: conditional and unconditional halves in one batched call. `uninputs` has one
    row (the empty or negative prompt, the null class) shared by every image. A model without conditioners has
    nothing to guide by: one call per step."""
    if not self.conditioner_names:
      cond = model.condition(inputs)
      return lambda x, t: model(x, t, cond)
    n = inputs["tokens"].shape[0]
    both = jax.tree.map(lambda c, u: jnp.concatenate([c, jnp.broadcast_to(u, (n, *u.shape[1:])).astype(c.dtype)]),
                        inputs, uninputs)
    cond = model.condition(both)
    return samplers.classifier_free_guidance(lambda x, t: model(x, t, cond), guidance_scale,
                                             self.config.sample.guidance_rescale)

  def sampling_options(self) -> dict:
    """`samplers.sample`'s options from `sample.*` for this objective."""
    s, d = self.config.sample, self.config.diffusion
    options = dict(sampler_options(s, s.sampler), clip_x0=s.clip_x0, prediction_type=self.prediction_type,
                   num_steps=int(s.num_steps), sampler=s.sampler)
    if self.objective == "flow":
      options["num_train_timesteps"] = d.num_timesteps
    return options

  def _generate_fn(self, num_images: int, guidance_scale: float):
    """`(model, inputs, uninputs, rng) -> images in [-1, 1]`: the whole sampler (and the VAE decoder) as one program."""
    shape = (num_images, *self.shape)
    options = self.sampling_options()

    def generate(model, inputs, uninputs, rng):
      rng_noise, rng_sample = jax.random.split(rng)
      model_fn = self.guided_model_fn(model, inputs, uninputs, guidance_scale)
      model_fn = guides_lib.guided(model_fn, self.guides, model.guide, inputs, jax.random.fold_in(rng, 2),
                                   self.schedule, self.prediction_type)
      x = samplers.sample(model_fn, self.schedule, jax.random.normal(rng_noise, shape, jnp.float32), rng_sample,
                          **options)
      if self.latents is not None:
        x = model.vae.decode(x / self.latents.scale + self.latents.shift).astype(jnp.float32)
      return jnp.clip(x, -1.0, 1.0) if self.latents is not None else x

    return generate

  def prompt_inputs(self, prompts: Sequence[str], labels=None) -> dict[str, np.ndarray]:
    tokens = self.tokenizer(list(prompts), self.config.data.max_text_len)
    labels = np.full(len(prompts), -1, np.int32) if labels is None else np.asarray(labels, np.int32)
    inputs = {"tokens": np.asarray(tokens, np.int32), "label": labels}
    for guide in self.guides:
      inputs.update(guide.inputs(prompts, labels))
    return inputs

  def generate(self, ctx: ModelContext, prompts: Sequence[str], seed: int, *, labels=None, guidance_scale=None,
               negative_prompt=None) -> np.ndarray:
    """Images in [-1, 1] for `prompts` (and class `labels` if the model takes them; unknown = null class), in
    fixed-size chunks so one program is compiled; guidance pushes away from `negative_prompt` (default
    `sample.negative_prompt`; '' = the empty caption)."""
    s = self.config.sample
    scale = s.guidance_scale if guidance_scale is None else guidance_scale
    chunk = min(int(s.batch_size), len(prompts))
    fn = ctx.jit(self._generate_fn(chunk, scale), key=(self, "generate", chunk, float(scale)))
    negative = s.negative_prompt if negative_prompt is None else negative_prompt
    uninputs = self.prompt_inputs([negative])
    guides = "".join(f", {g.name} guidance {g.scale:g}" for g in self.guides)
    logging.info("sampling %d images in chunks of %d: %s, %d steps, guidance %g%s", len(prompts), chunk, s.sampler,
                 int(s.num_steps), scale, guides)
    return host.run_chunked(lambda inputs, rng: fn(inputs, uninputs, rng), self.prompt_inputs(prompts, labels), chunk,
                            extra=lambda i: (jax.random.fold_in(jax.random.key(seed), i),), desc="sampling")

  def label_prompts(self, per_class: int, template: str = "") -> tuple[list[str], np.ndarray]:
    return pipeline.label_prompts(self.config.data, per_class, template)

  def heldout_images(self, ctx: ModelContext, max_examples: int, *, split: str = "",
                     batch_size: int = 0) -> np.ndarray:
    """The first `max_examples` images (0: all) of `split` (default the eval split), [N, H, W, C] in [-1, 1], read
    by default in training-sized batches (those split evenly over the mesh's batch shards)."""
    out = split_outputs(ctx, self.config.data, split or self.config.data.eval_split,
                        batch_size or int(self.config.train.batch_size), lambda batch: {"image": batch["image"]},
                        max_examples=max_examples, examples=self.data_examples)
    return out["image"]

  def sample(self, ctx: ModelContext, out_dir: str) -> dict[str, Any]:
    s = self.config.sample
    if s.prompts:
      prompts, labels = [p for p in s.prompts for _ in range(s.per_prompt)], None
    else:
      prompts, labels = self.label_prompts(s.per_prompt, s.template)
    images = self.generate(ctx, prompts, int(s.seed), labels=labels)
    if not ctx.is_main_process:
      return {}
    extra = [{"label": int(l)} for l in labels] if labels is not None else None
    return image_io.save_samples(out_dir, images, prompts, grid_cols=s.per_prompt, extra=extra)  # a row per prompt

  # ------------------------------------------------------------------ planning
  def activation_sites(self) -> Optional[list[tuple[int, int, int]]]:
    """(count, tokens, width) of the row-parallel layers of the denoiser and a trained text encoder."""
    if self.latents is not None and self.denoiser == "unet":
      return None  # the U-Net's token counts follow the VAE's latent size; not modelled
    m, d = self.config.model, self.config.data
    sites = []
    if "text" in self.conditioner_names:
      sites.append((2 * int(m.text_layers), int(d.max_text_len), int(m.text_width)))
    c = self.denoiser_config()
    if self.denoiser == "dit":
      cross = bool(c.context_dim) and c.conditioning == "cross_attention"
      joint = bool(c.context_dim) and not cross
      tokens = (self.shape[0] // c.patch_size) ** 2 + (int(d.max_text_len) if joint else 0)
      sites.append(((3 if cross else 2) * c.depth, tokens, c.hidden_size))
      return sites
    per_block = 3 if c.cross_attention_dim else 2  # self-attention, cross-attention, feed-forward
    for level, channels in enumerate(c.block_out_channels):
      tokens = (self.shape[0] // 2**level) ** 2
      blocks = (c.layers_at(level) * c.attention_levels[level] + (c.layers_at(level) + 1) * c.up_attention_at(level))
      if level == c.levels - 1 and c.use_mid_block and c.mid_block_attention:
        blocks += 1
      sites.append((per_block * blocks * c.transformer_layers_at(level), tokens, channels))
    return sites

