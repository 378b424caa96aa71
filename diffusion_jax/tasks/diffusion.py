"""Pixel diffusion: a U-Net or DiT denoiser, conditioned on captions and/or class labels, trained with the DDPM
objective or as a rectified flow.

Config choices (all optional, so older configs keep their meaning):
  model.denoiser           'unet' (default) or 'dit' (`model.variant`, e.g. 'S/4', with per-field overrides).
  model.text_conditioning  True (default): a caption encoder feeds the denoiser. False: no text tower at all; the
                           denoiser sees only the class label (`model.num_classes` > 0), as the DiT paper's models.
  diffusion.objective      'diffusion' (default; `diffusion.prediction_type`) or 'flow' (rectified flow, the
                           velocity noise - x_0, `flow.time_sampling`; sampled with `sample.sampler='flow_euler'`).
  sample.clip_x0 / use_karras_sigmas / shift   passed to the samplers that take them.
  sample.negative_prompt   what the unconditional half of guidance is conditioned on ('' = the empty caption).
  latent.*                 latent diffusion: the denoiser trains on a frozen VAE's latents and its samples are decoded
                           (`diffusion_jax.tasks.latents`, which also caches the latents to ArrayRecord).
  text.clip_workdir        a finished contrastive run whose text tower, frozen, encodes the prompts
                           (`diffusion_jax.tasks.frozen`); otherwise a caption encoder is trained with the denoiser.

Classifier-free guidance is learned by replacing a fraction of captions (and class labels, with the null class)
by the empty caption during training (with a frozen tower: by its states of the empty caption); sampling runs
conditional and unconditional halves in one batched call.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from diffusion_jax.config import ConfigError
from diffusion_jax.data import pipeline, tokenizers
from diffusion_jax.diffusion import flow, objectives, samplers
from diffusion_jax.diffusion.schedules import NoiseSchedule
from diffusion_jax.models import remat
from diffusion_jax.models.dit import DiT, DiTConfig, dit_config
from diffusion_jax.models.text import TextEncoder, TextEncoderConfig
from diffusion_jax.models.unet import UNet2DConditionModel, UNetConfig
from diffusion_jax.tasks import frozen, latents, reflow
from diffusion_jax.tasks.base import ModelContext, Task, register


class TextConditionedDenoiser(nnx.Module):
  """Caption encoder + U-Net; `denoiser(x_t, t, tokens)` predicts ε (or v / x0).

  Without a text config the caption states come from a frozen tower outside the model (`denoise` only).
  """

  def __init__(self, unet_cfg: UNetConfig, text_cfg: TextEncoderConfig | None, *, rngs: nnx.Rngs):
    self.text_encoder = TextEncoder(text_cfg, rngs=rngs) if text_cfg is not None else None
    self.unet = UNet2DConditionModel(unet_cfg, rngs=rngs)

  def encode_text(self, tokens):
    return self.text_encoder(tokens)

  def denoise(self, x_t, t, text_states, pooled, class_labels=None):
    return self.unet(x_t, t, text_states, pooled=pooled, class_labels=class_labels)

  def __call__(self, x_t, t, tokens, class_labels=None):
    states, pooled = self.encode_text(tokens)
    return self.denoise(x_t, t, states, pooled, class_labels)


class DiTDenoiser(nnx.Module):
  """A DiT with an optional caption encoder; the same `encode_text` / `denoise` interface as the U-Net pair.

  Without a text encoder `encode_text` returns (None, None) and the DiT is conditioned on the class label alone.
  """

  def __init__(self, dit_cfg: DiTConfig, text_cfg: TextEncoderConfig | None, *, rngs: nnx.Rngs):
    self.text_encoder = TextEncoder(text_cfg, rngs=rngs) if text_cfg is not None else None
    self.dit = DiT(dit_cfg, rngs=rngs)

  def encode_text(self, tokens):
    return self.text_encoder(tokens) if self.text_encoder is not None else (None, None)

  def denoise(self, x_t, t, text_states, pooled, class_labels=None):
    del pooled  # DiT conditions on the token states (cross/joint attention) and the class embedding only
    return self.dit(x_t, t, class_labels=class_labels, context=text_states)

  def __call__(self, x_t, t, tokens, class_labels=None):
    states, pooled = self.encode_text(tokens)
    return self.denoise(x_t, t, states, pooled, class_labels)


def denoiser_kind(config) -> str:
  kind = config.model.get("denoiser", "unet")
  if kind not in ("unet", "dit"):
    raise ConfigError(f"model.denoiser must be 'unet' or 'dit', got {kind!r}")
  return kind


def uses_text(config) -> bool:
  return bool(config.model.get("text_conditioning", True))


def objective_kind(config) -> str:
  kind = config.diffusion.get("objective", "diffusion")
  if kind not in ("diffusion", "flow"):
    raise ConfigError(f"diffusion.objective must be 'diffusion' or 'flow', got {kind!r}")
  return kind


def dit_model_config(config, *, shape=None, text_dims=None) -> DiTConfig:
  """`model.variant` (e.g. 'S/4') with `patch_size`, `hidden_size`, `depth`, `num_heads` overriding it when > 0.

  `shape` (size, size, channels) of what is denoised and `text_dims` (token width, pooled width) default to the
  data's pixels and `model.text_width`; latent diffusion and a frozen text tower give their own.
  """
  m, d = config.model, config.data
  overrides = {k: int(m[k]) for k in ("patch_size", "hidden_size", "depth", "num_heads") if m.get(k, 0)}
  size, _, channels = shape or (d.image_size, d.image_size, d.channels)
  context_dim = (text_dims or (m.text_width,))[0] if uses_text(config) else 0
  try:
    return dit_config(
        m.variant, **overrides, input_size=size, in_channels=channels, learn_sigma=False,
        mlp_ratio=float(m.get("mlp_ratio", 4.0)), num_classes=m.num_classes,
        context_dim=context_dim, conditioning=m.get("dit_text_conditioning", "cross_attention"),
        dtype=_dtype(m.compute_dtype), attention_impl=m.attention_impl or None, remat=remat.from_config(m))
  except ValueError as e:
    raise ConfigError(str(e)) from e


def unet_config(config, *, channels=None, text_dims=None) -> UNetConfig:
  """The U-Net of `config.model`; `channels` and `text_dims` as in `dit_model_config`."""
  m, d = config.model, config.data
  channels = channels or d.channels
  context_dim, pooled_dim = text_dims or (m.text_width, m.text_width)
  return UNetConfig(
      in_channels=channels, out_channels=channels, block_out_channels=tuple(m.block_out_channels),
      layers_per_block=m.layers_per_block, attention_levels=tuple(m.attention_levels),
      mid_block_attention=m.mid_block_attention, num_attention_heads=m.num_attention_heads,
      cross_attention_dim=context_dim, transformer_layers_per_block=m.transformer_layers_per_block,
      use_linear_projection=m.use_linear_projection, norm_num_groups=m.norm_num_groups,
      num_class_embeds=m.num_classes, pooled_dim=pooled_dim if m.use_pooled_text else 0,
      resnet_time_scale_shift=m.resnet_time_scale_shift, dtype=_dtype(m.compute_dtype),
      attention_impl=m.attention_impl or None, remat=remat.from_config(m))


def text_config(config, tokenizer) -> TextEncoderConfig:
  m = config.model
  return TextEncoderConfig(vocab_size=tokenizer.vocab_size, max_len=config.data.max_text_len, width=m.text_width,
                           layers=m.text_layers, heads=m.text_heads, pad_id=tokenizer.pad_id,
                           dtype=_dtype(m.compute_dtype), remat=remat.from_config(m))


def _dtype(name: str):
  return None if name in ("", "float32") else jnp.dtype(name)


def sampler_options(sample_cfg, sampler: str) -> dict:
  """The `samplers.sample` options of `sample_cfg` that `sampler` takes (it refuses the others)."""
  taken = samplers.SAMPLERS[sampler].options
  wanted = {"eta": sample_cfg.get("eta", 0.0), "use_karras_sigmas": sample_cfg.get("use_karras_sigmas", False),
            "shift": sample_cfg.get("shift", 1.0)}
  return {k: v for k, v in wanted.items() if k in taken}


@register("text_to_image_diffusion")
@register("diffusion")
class TextToImageDiffusion(Task):

  def __init__(self, config):
    super().__init__(config)
    d = config.diffusion
    self.denoiser = denoiser_kind(config)
    self.text = uses_text(config)
    self.objective = objective_kind(config)
    if not self.text and self.denoiser == "unet":
      raise ConfigError("the U-Net denoiser needs text conditioning (model.text_conditioning=True)")
    self.tokenizer = tokenizers.get_tokenizer(config.data.tokenizer)
    self._samplers = {}  # see _sampler
    self.schedule = NoiseSchedule.create(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)
    self.null_tokens = jnp.asarray(self.tokenizer([""], config.data.max_text_len)[0])
    # A flow model predicts the velocity noise - x_0 whatever diffusion.prediction_type says.
    self.prediction_type = samplers.FLOW_PREDICTION if self.objective == "flow" else d.prediction_type
    sampler = config.sample.sampler
    if sampler not in samplers.SAMPLERS:
      raise ConfigError(f"unknown sample.sampler {sampler!r}; expected one of {tuple(samplers.SAMPLERS)}")
    if self.prediction_type not in samplers.SAMPLERS[sampler].prediction_types:
      raise ConfigError(f"sample.sampler={sampler!r} cannot sample a {self.objective!r} model "
                        f"(prediction_type {self.prediction_type!r})"
                        + ("; use 'flow_euler'" if self.objective == "flow" else ""))
    self.reflow = reflow.options(config)
    self._teacher = None
    if self.reflow is not None and self.objective != "flow":
      raise ConfigError("flow.reflow.teacher_workdir is set but diffusion.objective is not 'flow': reflow retrains a "
                        "rectified flow")
    time_sampling = self._flow_time_options()["time_sampling"]
    if self.objective == "flow" and time_sampling not in flow.TIME_SAMPLINGS:
      raise ConfigError(f"flow.time_sampling must be one of {flow.TIME_SAMPLINGS}, got {time_sampling!r}")
    if self.objective != "flow" and d.get("time_sampling", "uniform") not in flow.TIME_SAMPLINGS:
      raise ConfigError(f"diffusion.time_sampling must be one of {flow.TIME_SAMPLINGS}, "
                        f"got {d.get('time_sampling')!r}")
    trained = set(config.data.caption_templates)
    for template in config.get("eval", {}).get("heldout_templates", ()):
      if template in trained:
        raise ConfigError(f"eval.heldout_templates: {template!r} is one of data.caption_templates, so not held out")
    latent_opts = latents.options(config)
    self.latents = latents.LatentSpace(config, latent_opts) if latent_opts is not None else None
    if self.latents is not None and self.reflow is not None:
      raise ConfigError("reflow (flow.reflow.teacher_workdir) is not supported with latent diffusion (latent.*)")
    data = config.data
    self.shape = self.latents.shape if self.latents else (data.image_size, data.image_size, data.channels)
    self.text_tower = frozen.text_tower(config)
    if self.text_tower is not None:
      if not self.text:
        raise ConfigError("text.clip_workdir is set but model.text_conditioning=False")
      t = self.text_tower
      if (data.tokenizer, data.max_text_len) != (t.tokenizer, t.max_len):
        raise ConfigError(f"data.tokenizer={data.tokenizer!r} and data.max_text_len={data.max_text_len} must match "
                          f"the text tower's ({t.tokenizer!r}, {t.max_len}) from text.clip_workdir")
    self._null_text = None

  def _flow_time_options(self) -> dict:
    f = self.config.get("flow") or {}
    return dict(time_sampling=f.get("time_sampling", "logit_normal"), logit_mean=float(f.get("logit_mean", 0.0)),
                logit_std=float(f.get("logit_std", 1.0)))

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    tower = self.text_tower
    text_cfg = text_config(self.config, self.tokenizer) if self.text and tower is None else None
    text_dims = (tower.width, tower.embed_dim) if tower is not None else None
    if self.denoiser == "dit":
      return DiTDenoiser(dit_model_config(self.config, shape=self.shape, text_dims=text_dims), text_cfg, rngs=rngs)
    return TextConditionedDenoiser(unet_config(self.config, channels=self.shape[-1], text_dims=text_dims), text_cfg,
                                   rngs=rngs)

  # ------------------------------------------------------------------ conditioning
  def null_text(self) -> tuple[np.ndarray, np.ndarray]:
    """The frozen tower's (states [L, W], pooled [D]) of the empty caption: what condition dropout substitutes."""
    if self._null_text is None:
      # Computed before the loss is traced (train_dataset, model_inputs): the tower cannot run inside a trace.
      states, pooled = self.text_tower.encode(self.null_tokens[None])
      self._null_text = states[0], pooled[0]
    return self._null_text

  def prompt_condition(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """What the sampler conditions on for these tokens: the tokens themselves, or a frozen tower's states."""
    if self.text_tower is None:
      return {"tokens": np.asarray(tokens)}
    states, pooled = self.text_tower.encode(tokens)
    return {"states": states, "pooled": pooled}

  def _text_states(self, model, condition: dict):
    if "tokens" in condition:
      return model.encode_text(condition["tokens"])
    return condition["states"], condition["pooled"]

  def model_inputs(self, batch: dict, workdir: str) -> dict:
    """A batch of the pixel pipeline as the loss takes it: latents for pixels, frozen text states for tokens."""
    if self.text_tower is not None:
      self.null_text()
    if self.latents is not None:
      batch = self.latents.to_latents(batch, self.latents.scale(workdir))
    return latents.with_text_states(batch, self.text_tower)

  # ------------------------------------------------------------------ reflow
  def reflow_teacher(self) -> ModelContext:
    if self._teacher is None:
      self._teacher = reflow.load_teacher(self.config, self.reflow["teacher_workdir"])
    return self._teacher

  def initial_weights(self):
    if self.reflow is None:
      return None
    return reflow.teacher_weights(self.reflow_teacher())  # the reflowed model starts where the teacher ended

  def train_dataset(self, workdir, *, global_batch_size, seed, process_index, process_count):
    if self.text_tower is not None:
      self.null_text()
    if self.latents is not None:
      return self.latents.train_dataset(workdir, self.text_tower, global_batch_size=global_batch_size, seed=seed,
                                        process_index=process_index, process_count=process_count)
    if self.reflow is None:
      ds = super().train_dataset(workdir, global_batch_size=global_batch_size, seed=seed,
                                 process_index=process_index, process_count=process_count)
      return ds if self.text_tower is None else ds.map(lambda b: latents.with_text_states(b, self.text_tower))
    pairs = reflow.pairs_for_run(self, workdir, self.reflow)
    pairs["valid"] = np.ones(len(pairs["label"]), np.float32)
    return pipeline.make_array_dataset(pairs, global_batch_size=global_batch_size, seed=seed,
                                       process_index=process_index, process_count=process_count)

  def reflow_pairs_fn(self, num_images: int, guidance_scale: float, num_steps: int):
    """A jittable `(model, tokens, labels, rng) -> (noise, x_0)`: the guided flow's samples and their noise."""
    d = self.config.diffusion
    shape = (num_images, *self.shape)
    clip = bool(self.config.sample.get("clip_x0", True))
    shift = float(self.config.sample.get("shift", 1.0))

    def pairs(model, tokens, labels, rng):
      model_fn = self._guided_model_fn(model, {"tokens": tokens}, {"tokens": self.null_tokens[None]}, labels,
                                       guidance_scale)
      noise, x0 = flow.reflow_pairs(model_fn, jax.random.normal(rng, shape, jnp.float32), num_steps=num_steps,
                                    shift=shift, num_train_timesteps=d.num_timesteps)
      return noise, (jnp.clip(x0, -1.0, 1.0) if clip else x0)

    return pairs

  # ------------------------------------------------------------------ training
  def loss(self, model, batch, rng):
    d = self.config.diffusion
    rng_drop, rng_diff = jax.random.split(rng)
    tokens = batch["tokens"]
    drop = jax.random.bernoulli(rng_drop, d.cond_drop_prob, (tokens.shape[0],))
    labels = None
    if self.config.model.num_classes:  # the null class shares the caption's dropout
      labels = jnp.where(drop | (batch["label"] < 0), self.config.model.num_classes, batch["label"])
    if self.text_tower is not None:  # the frozen tower's states came with the batch
      null_states, null_pooled = self.null_text()
      states = jnp.where(drop[:, None, None], null_states[None], batch["text_states"])
      pooled = jnp.where(drop[:, None], null_pooled[None], batch["text_pooled"])
    else:
      states, pooled = model.encode_text(jnp.where(drop[:, None], self.null_tokens[None, :], tokens))
    model_fn = lambda x_t, t: model.denoise(x_t, t, states, pooled, labels)
    if self.objective == "flow":
      # Reflow batches carry the noise each x_0 was sampled from; plain batches draw fresh noise.
      loss, aux = flow.flow_matching_loss(model_fn, batch["image"], rng_diff, weights=batch["valid"],
                                          noise=batch.get("noise"), num_train_timesteps=d.num_timesteps,
                                          **self._flow_time_options())
    else:
      loss, aux = objectives.diffusion_loss(model_fn, self.schedule, batch["image"], rng_diff,
                                            prediction_type=d.prediction_type, weights=batch["valid"],
                                            snr_gamma=float(d.get("snr_gamma", 0.0)),
                                            time_sampling=d.get("time_sampling", "uniform"),
                                            logit_mean=float(d.get("logit_mean", 0.0)),
                                            logit_std=float(d.get("logit_std", 1.0)))
    metrics = {"count/skipped_examples": jnp.sum(1.0 - batch["valid"])}
    metrics.update({k: v for k, v in aux.items() if jnp.ndim(v) == 0})
    return loss, metrics

  # ------------------------------------------------------------------ sampling
  def _guided_model_fn(self, model, condition, uncondition, labels, guidance_scale: float):
    """`(x, t) -> guided output`: conditional and unconditional halves in one batched call.

    `condition` and `uncondition` are `prompt_condition` dicts; `uncondition` has one row (the empty or negative
    prompt), shared by every image.
    """
    num_classes = self.config.model.num_classes
    both = jax.tree.map(lambda c, u: jnp.concatenate([c, jnp.broadcast_to(u, c.shape).astype(c.dtype)]), condition,
                        uncondition)
    states, pooled = self._text_states(model, both)
    both_labels = jnp.concatenate([labels, jnp.full_like(labels, num_classes)]) if num_classes else None
    batched = lambda x, t: model.denoise(x, t, states, pooled, both_labels)
    return samplers.classifier_free_guidance(batched, guidance_scale, self.config.sample.guidance_rescale)

  def _generate_fn(self, num_images: int, guidance_scale: float):
    """A jittable `(model, condition, uncondition, labels, rng) -> samples` running the whole sampler as one program.

    Samples are images in [-1, 1], or latents for latent diffusion (`generate` decodes them).
    """
    s, d = self.config.sample, self.config.diffusion
    shape = (num_images, *self.shape)
    schedule = self.schedule
    # Pixel samplers clip x_0 to the data range by default, latent ones not (latents have no fixed range); a
    # config may choose (or rely on the sampler's diffusers default with None).
    options = dict(sampler_options(s, s.sampler), clip_x0=s.get("clip_x0", self.latents is None),
                   prediction_type=self.prediction_type, num_steps=int(s.num_steps), sampler=s.sampler)
    if self.objective == "flow":
      options["num_train_timesteps"] = d.num_timesteps

    def generate(model, condition, uncondition, labels, rng):
      rng_noise, rng_sample = jax.random.split(rng)
      model_fn = self._guided_model_fn(model, condition, uncondition, labels, guidance_scale)
      noise = jax.random.normal(rng_noise, shape, jnp.float32)
      return samplers.sample(model_fn, schedule, noise, rng_sample, **options)

    return generate

  def _sampler(self, ctx: ModelContext, chunk: int, guidance_scale: float):
    """The jitted sampler for this model, batch and guidance scale, compiled once however often it is called (an
    evaluation samples once per prompt phrasing, then the sample grid) and whichever context holds the weights."""
    key = (ctx.graphdef, chunk, float(guidance_scale))
    jitted = self._samplers.get(key)
    if jitted is None:
      graphdef, rest, generate = ctx.graphdef, ctx.rest, self._generate_fn(chunk, guidance_scale)
      jitted = jax.jit(lambda params, *args: generate(nnx.merge(graphdef, params, rest), *args))
      self._samplers[key] = jitted
    return lambda *args: jitted(ctx.params, *args)

  def generate(self, ctx: ModelContext, prompts: Sequence[str], seed: int, *, labels=None,
               guidance_scale=None, negative_prompt=None) -> np.ndarray:
    """Images in [-1, 1] for `prompts` (and class `labels` if the model takes them; unknown = null class),
    generated in fixed-size chunks so one program is compiled; guidance pushes away from `negative_prompt`
    (default `sample.negative_prompt`, '' = the empty caption)."""
    s, max_len = self.config.sample, self.config.data.max_text_len
    scale = s.guidance_scale if guidance_scale is None else guidance_scale
    chunk = min(int(s.batch_size), len(prompts))
    fn = self._sampler(ctx, chunk, scale)
    negative = s.get("negative_prompt", "") if negative_prompt is None else negative_prompt
    uncondition = self.prompt_condition(self.tokenizer([negative], max_len) if negative else self.null_tokens[None])
    latent_scale = self.latents.scale(ctx.workdir) if self.latents is not None else None
    tokens = self.tokenizer(list(prompts), max_len)
    null_label = self.config.model.num_classes
    labels = np.full(len(prompts), null_label, np.int32) if labels is None else np.asarray(labels, np.int32)
    out = []
    for i, start in enumerate(range(0, len(prompts), chunk)):
      part, part_labels = tokens[start:start + chunk], labels[start:start + chunk]
      n = len(part)
      if n < chunk:  # pad the last chunk to the compiled size
        part = np.concatenate([part, np.repeat(part[-1:], chunk - n, axis=0)])
        part_labels = np.concatenate([part_labels, np.repeat(part_labels[-1:], chunk - n)])
      # numpy in: replicated on every process
      images = fn(self.prompt_condition(part), uncondition, part_labels, jax.random.fold_in(jax.random.key(seed), i))
      if jax.process_count() > 1:
        images = multihost_utils.process_allgather(images, tiled=True)
      images = np.asarray(jax.device_get(images))
      if self.latents is not None:
        images = self.latents.decode(images, latent_scale)
      out.append(images[:n])
    return np.concatenate(out)

  def _label_prompts(self, per_class: int, template: str | None = None) -> tuple[list[str], np.ndarray]:
    labels = np.repeat(np.arange(len(self.config.data.class_names)), per_class).astype(np.int32)
    return pipeline.prompts_for_labels(self.config.data, labels, template), labels

  def sample(self, ctx: ModelContext, out_dir: str) -> dict[str, Any]:
    from diffusion_jax.eval import image_io
    s = self.config.sample
    if s.prompts:
      prompts, labels = [p for p in s.prompts for _ in range(s.per_prompt)], None
    else:
      prompts, labels = self._label_prompts(s.per_prompt, s.get("template", ""))
    images = self.generate(ctx, prompts, int(s.seed), labels=labels)
    extra = None
    if labels is not None:
      extra = [{"label": int(l)} for l in labels]
    if not ctx.is_main_process:
      return {}
    written = image_io.save_samples(out_dir, images, prompts, grid_cols=s.per_prompt if labels is not None else None,
                                    extra=extra)
    from PIL import Image
    written["grid_image"] = np.asarray(Image.open(written["grid"]).convert("RGB"))
    return written

  # ------------------------------------------------------------------ evaluation
  def evaluate(self, ctx: ModelContext) -> dict[str, float]:
    e = self.config.eval
    metrics = self._eval_loss(ctx) if e.loss_batches else {}
    if e.digit_accuracy_samples_per_class:
      metrics.update(self.digit_accuracy(ctx, e.digit_accuracy_samples_per_class))
      heldout = [self.digit_accuracy(ctx, e.digit_accuracy_samples_per_class, template=t)["eval/digit_accuracy"]
                 for t in e.get("heldout_templates", ())]
      if heldout:
        # Phrasings the training captions never used: how far the text conditioning generalises.
        metrics["eval/digit_accuracy_heldout"] = float(np.mean(heldout))
        metrics.update({f"eval/digit_accuracy_heldout_{i}": a for i, a in enumerate(heldout)})
    return metrics

  def _eval_loss(self, ctx: ModelContext) -> dict[str, float]:
    """Denoising (or flow) loss on held-out batches, with fixed noise so evaluations are comparable across steps."""
    e, data = self.config.eval, self.config.data
    ds = pipeline.make_dataset(data, data.eval_split, global_batch_size=int(e.batch_size), seed=0,
                               process_index=jax.process_index(), process_count=jax.process_count(),
                               shuffle=False, repeat=False)
    loss_fn = ctx.jit_apply(lambda model, batch, rng: self.loss(model, batch, rng))
    losses = []
    it = iter(ds)
    for i in range(int(e.loss_batches)):
      try:
        batch = next(it)
      except StopIteration:
        break
      loss, _ = loss_fn(ctx.global_batch(self.model_inputs(batch, ctx.workdir)), jax.random.key(1000 + i))
      losses.append(float(loss))
    return {"eval/loss": float(np.mean(losses))} if losses else {}

  def digit_accuracy(self, ctx: ModelContext, per_class: int, *, seed: int = 1234, guidance_scale=None,
                     template: str | None = None) -> dict:
    """The share of generated digits that an independent MNIST classifier labels as the prompted digit, prompted with
    `template` (default: the first caption template)."""
    from diffusion_jax.eval import digit_classifier
    judge = digit_classifier.load_or_train(self.config.eval.classifier_cache_dir or None)
    prompts, labels = self._label_prompts(per_class, template)
    images = self.generate(ctx, prompts, seed, labels=labels, guidance_scale=guidance_scale)
    predicted = judge.predict(images)
    correct = predicted == labels
    out = {"eval/digit_accuracy": float(np.mean(correct))}
    for c in range(len(self.config.data.class_names)):
      out[f"eval/digit_accuracy_{c}"] = float(np.mean(correct[labels == c]))
    logging.info("digit accuracy %.4f over %d samples like %r", out["eval/digit_accuracy"], len(labels), prompts[0])
    return out
