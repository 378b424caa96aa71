"""Generative adversarial networks on the trainer: two updates per step, each with its own parameters and optimizer.

  'discriminator'  (optimizer section `disc_optim`) `gan.n_critic` steps per train step, each on its own
                   1/n_critic of the batch's rows (`parts.Update(repeat=..., split_batch=True)`);
  'generator'      (section `optim`) one step on the whole batch, against the discriminator as the first update
                   left it. Each update differentiates its own player only: no stop_gradient stands in for the
                   other's optimizer. The EMA is the generator's alone (`ema.updates=('generator',)`).
BatchNorm statistics and spectral-norm vectors are mutable state, carried by the trainer; the discriminator's are
updated by both updates' forward passes, as in the reference implementations.

Config:
  model.*        `models.gan.GANConfig`: architecture ('dcgan' | 'resnet'), z_dim, g_channels, d_channels, d_hidden,
                 cond_dim, g_batch_norm, g_conditioning ('batch_norm' | 'concat'), d_batch_norm, spectral_norm.
  gan.loss       'minimax' | 'non_saturating' | 'wgan' | 'wgan_gp' | 'hinge' (`gan.losses`); 'wgan' needs
                 `disc_optim.clip_weights` > 0, 'wgan_gp' adds `gan.gp_weight` × the gradient penalty;
                 `gan.r1_gamma` > 0 adds γ/2 · E‖∇D(x_real)‖² to any of them.
  gan.condition  'class' (the label), 'text' (the caption's embedding by the frozen text tower of a finished CLIP
                 run, `text.clip_workdir`, which both players take) or 'none'.
  gan.conditioning  the discriminator's: 'projection' or 'concat' (`models.gan`).
  gan.matching_aware  (text) GAN-INT-CLS's discriminator: a real image with a mismatched caption — one of another
                 row whose digit differs — is a further negative, weighted half with the generated images.
  sample.*       per_prompt (images per class or prompt), prompts (text: captions instead of the per-class grid),
                 classes (class: the class ids to draw, e.g. (3, 7); empty: every class),
                 seed, batch_size, template, truncation (t > 0: every latent component drawn from N(0, 1)
                 truncated to [-t, t], i.e. values beyond t resampled — BigGAN's trick), interpolate (N > 0: N
                 strips of per_prompt images along the slerp between two random latents, one condition per strip).

`generate` and `label_prompts` are what the `digit_accuracy` evaluator calls; the generator runs in evaluation mode
(BatchNorm running statistics) with its EMA parameters when `ema.use_for_eval`.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.config import ConfigError
from diffusion_jax.contrastive.losses import l2_normalize
from diffusion_jax.data import pipeline, tokenizers
from diffusion_jax.eval import image_io
from diffusion_jax.gan import losses
from diffusion_jax.models.clip import CLIPTextModelWithProjection
from diffusion_jax.models.conditioners import FrozenTextConditioner
from diffusion_jax.models.gan import CONDITIONINGS, CONDITIONS, GAN, GANConfig
from diffusion_jax.parallel import host
from diffusion_jax.tasks import clip_towers
from diffusion_jax.tasks.unclip_decoder import slerp
from diffusion_jax.train import parts
from diffusion_jax.train.task import ModelContext, Task, register


def _choice(value, allowed, what):
  if value not in allowed:
    raise ConfigError(f"{what} must be one of {allowed}, got {value!r}")
  return value


def penalty_critic(discriminator: nnx.Module, cond):
  """`x -> logits` of a copy of `discriminator` for the gradient penalties: a function of the input alone, whose
  state updates (spectral-norm vectors) stay in the copy — the penalty is a differentiated probe, not a pass that
  should advance the power iteration."""
  graphdef, state = nnx.split(discriminator)
  return lambda x: nnx.merge(graphdef, state)(x, cond)


@register("gan")
class GANTask(Task):

  def __init__(self, config):
    super().__init__(config)
    g, m, d = config.gan, config.model, config.data
    self.kind = _choice(g.loss, losses.LOSSES, "gan.loss")
    self.condition_kind = _choice(g.condition, CONDITIONS, "gan.condition")
    _choice(g.conditioning, CONDITIONINGS, "gan.conditioning")
    if int(g.n_critic) < 1:
      raise ConfigError(f"gan.n_critic must be >= 1, got {g.n_critic}")
    if g.gp_weight < 0 or g.r1_gamma < 0:
      raise ConfigError("gan.gp_weight and gan.r1_gamma must be >= 0")
    clip = float(config.disc_optim.clip_weights)
    if self.kind == "wgan" and clip <= 0:
      raise ConfigError("gan.loss='wgan' keeps its critic Lipschitz by weight clipping: set disc_optim.clip_weights "
                        "(e.g. 0.01), or use gan.loss='wgan_gp'")
    if (self.kind == "wgan_gp" or g.r1_gamma > 0) and m.d_batch_norm:
      raise ConfigError("gradient penalties (gan.loss='wgan_gp', gan.r1_gamma) take each image's own gradient: set "
                        "model.d_batch_norm=False, BatchNorm couples the rows")
    if g.matching_aware and self.condition_kind != "text":
      raise ConfigError("gan.matching_aware pairs real images with mismatched captions: it needs gan.condition='text'")
    if self.condition_kind != "text" and config.text.clip_workdir:
      raise ConfigError("text.clip_workdir is set but gan.condition is not 'text'")
    if config.sample.prompts and self.condition_kind != "text":
      raise ConfigError("sample.prompts are captions: they need gan.condition='text'")
    classes = tuple(config.sample.get("classes", ()))
    if classes and self.condition_kind != "class":
      raise ConfigError("sample.classes are class ids: they need gan.condition='class'")
    bad = [c for c in classes if not (isinstance(c, int) and 0 <= c < len(d.class_names))]
    if bad:
      raise ConfigError(f"sample.classes must be class ids in [0, {len(d.class_names)}), got {bad}")
    if config.sample.truncation < 0:
      raise ConfigError(f"sample.truncation must be >= 0 (0: off), got {config.sample.truncation}")
    if int(config.sample.interpolate) < 0:
      raise ConfigError(f"sample.interpolate must be >= 0 (0: off), got {config.sample.interpolate}")
    self.text_source = None
    text_dim = 0
    if self.condition_kind == "text":
      self.text_source = clip_towers.run_source("text.clip_workdir", config.text.clip_workdir, ("text",),
                                                target="text.tower", data=d)
      text_dim = int(self.text_source.task().model_config.embed_dim)
    self.tokenizer = tokenizers.get_tokenizer(d.tokenizer)
    try:
      self.model_config = GANConfig(
          architecture=m.architecture, image_size=int(d.image_size), channels=int(d.channels), z_dim=int(m.z_dim),
          g_channels=tuple(m.g_channels), d_channels=tuple(m.d_channels), d_hidden=int(m.d_hidden),
          cond=self.condition_kind, num_classes=len(d.class_names), text_dim=text_dim, cond_dim=int(m.cond_dim),
          conditioning=g.conditioning, g_batch_norm=bool(m.g_batch_norm), g_conditioning=m.g_conditioning,
          d_batch_norm=bool(m.d_batch_norm), spectral_norm=bool(m.spectral_norm))
    except ValueError as e:
      raise ConfigError(f"model: {e}") from None

  # ------------------------------------------------------------------ the model
  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    text = None
    if self.text_source is not None:
      clip = self.text_source.task().model_config
      null = self.tokenizer([""], self.config.data.max_text_len)[0]
      text = FrozenTextConditioner(CLIPTextModelWithProjection(clip.text, clip.embed_dim, rngs=rngs), null)
    return GAN(self.model_config, rngs=rngs, text=text)

  def frozen(self):
    return parts.under("text")

  def weight_sources(self):
    return [self.text_source] if self.text_source is not None else []

  def updates(self):
    return (parts.Update("discriminator", self.discriminator_loss, params=parts.under("discriminator"),
                         optimizer="disc_optim", repeat=int(self.config.gan.n_critic), split_batch=True),
            parts.Update("generator", self.generator_loss, params=parts.under("generator")))

  # ------------------------------------------------------------------ conditions and latents
  def caption_embedding(self, model, tokens: jax.Array) -> jax.Array:
    """The unit-length CLIP embedding of each caption (CLIP compares captions by cosine)."""
    return l2_normalize(model.text({"tokens": tokens})["text_pooled"])

  def condition(self, model, batch: dict) -> Optional[jax.Array]:
    """What both players are conditioned on: labels [B], caption embeddings [B, D] or None."""
    if self.condition_kind == "class":
      return batch["label"].astype(jnp.int32)
    if self.condition_kind == "text":
      return self.caption_embedding(model, batch["tokens"])
    return None

  def latents(self, rng: jax.Array, n: int, truncation: float = 0.0) -> jax.Array:
    """z ~ N(0, I) [n, z_dim]; with `truncation` t > 0 each component from the normal truncated to [-t, t]."""
    shape = (n, self.model_config.z_dim)
    if truncation > 0:
      return jax.random.truncated_normal(rng, -truncation, truncation, shape, jnp.float32)
    return jax.random.normal(rng, shape, jnp.float32)

  # ------------------------------------------------------------------ training
  def discriminator_loss(self, model, batch, rng):
    g = self.config.gan
    rng_z, rng_eps, rng_wrong = jax.random.split(rng, 3)
    real, weights = batch["image"], batch["valid"].astype(jnp.float32)
    cond = self.condition(model, batch)
    fake = model.generator(self.latents(rng_z, real.shape[0]), cond)
    real_logits = model.discriminator(real, cond)
    fake_logits = model.discriminator(fake, cond)
    negatives = losses.fake_term(self.kind, fake_logits, weights)
    metrics = {"real_logit": losses.weighted_mean(real_logits, weights),
               "fake_logit": losses.weighted_mean(fake_logits, weights),
               "count/skipped_examples": jnp.sum(1.0 - weights)}
    if g.matching_aware:
      rows, found = losses.mismatched_rows(batch["label"], weights, rng_wrong)
      wrong_logits = model.discriminator(real, cond[rows])
      negatives = 0.5 * (negatives + losses.fake_term(self.kind, wrong_logits, weights * found))
      metrics["mismatched_logit"] = losses.weighted_mean(wrong_logits, weights * found)
    loss = losses.real_term(self.kind, real_logits, weights) + negatives
    if self.kind in ("wgan", "wgan_gp"):
      metrics["wasserstein"] = metrics["real_logit"] - metrics["fake_logit"]
    if self.kind == "wgan_gp":
      eps = jax.random.uniform(rng_eps, (real.shape[0],))
      gp = losses.gradient_penalty(penalty_critic(model.discriminator, cond), real, fake, eps, weights)
      loss = loss + g.gp_weight * gp
      metrics["gradient_penalty"] = gp
    if g.r1_gamma > 0:
      r1 = losses.r1_penalty(penalty_critic(model.discriminator, cond), real, weights)
      loss = loss + 0.5 * g.r1_gamma * r1
      metrics["r1"] = r1
    return loss, metrics

  def generator_loss(self, model, batch, rng):
    weights = batch["valid"].astype(jnp.float32)
    cond = self.condition(model, batch)
    fake = model.generator(self.latents(rng, weights.shape[0]), cond)
    logits = model.discriminator(fake, cond)
    return losses.generator_loss(self.kind, logits, weights), {"fake_logit": losses.weighted_mean(logits, weights)}

  # ------------------------------------------------------------------ sampling
  def _generate(self, model, inputs: dict) -> jax.Array:
    cond = {"class": lambda: inputs["label"],
            "text": lambda: self.caption_embedding(model, inputs["tokens"]),
            "none": lambda: None}[self.condition_kind]()
    return model.generator(inputs["z"], cond).astype(jnp.float32)

  def generate(self, ctx: ModelContext, prompts: Sequence[str], seed: int, *, labels=None, guidance_scale=None,
               latents: Optional[np.ndarray] = None) -> np.ndarray:
    """Images [N, S, S, C] in [-1, 1] for `prompts` (text) or class `labels` (class), from latents drawn with `seed`
    (and `sample.truncation`) or given; in fixed-size chunks, so one program is compiled. A GAN has no guidance:
    `guidance_scale` is accepted for the evaluators' sake and ignored."""
    del guidance_scale
    n = len(prompts)
    if self.condition_kind == "class" and labels is None:
      raise ConfigError("a class-conditional GAN generates for class labels; give labels")
    if latents is None:
      latents = self.latents(jax.random.key(seed), n, float(self.config.sample.truncation))
    inputs = {"z": np.asarray(latents, np.float32),
              "label": np.full(n, -1, np.int32) if labels is None else np.asarray(labels, np.int32),
              "tokens": np.asarray(self.tokenizer(list(prompts), self.config.data.max_text_len), np.int32)}
    return host.run_chunked(ctx.jit(self._generate), inputs, min(int(self.config.sample.batch_size), n))

  def label_prompts(self, per_class: int, template: str = "") -> tuple[list[str], np.ndarray]:
    return pipeline.label_prompts(self.config.data, per_class, template)

  def _conditions(self, per: int) -> tuple[list[str], Optional[np.ndarray]]:
    """What `sample` draws for: `sample.prompts` or `sample.classes` (each `per` times), or every class `per`
    times."""
    s = self.config.sample
    if s.prompts:
      return [p for p in s.prompts for _ in range(per)], None
    classes = tuple(s.get("classes", ())) or range(len(self.config.data.class_names))
    labels = np.repeat(np.asarray(classes, np.int32), per)
    prompts = pipeline.prompts_for_labels(self.config.data, labels, s.template or None)
    if self.condition_kind == "none":
      return [""] * len(prompts), None
    return prompts, labels

  def sample(self, ctx: ModelContext, out_dir: str) -> dict[str, Any]:
    s = self.config.sample
    if int(s.interpolate):
      return self._interpolation(ctx, out_dir)
    prompts, labels = self._conditions(int(s.per_prompt))
    images = self.generate(ctx, prompts, int(s.seed), labels=labels)
    if not ctx.is_main_process:
      return {}
    extra = [{"truncation": float(s.truncation), **({"label": int(labels[i])} if labels is not None else {})}
             for i in range(len(prompts))]
    return image_io.save_samples(out_dir, images, prompts, grid_cols=int(s.per_prompt), extra=extra)

  def _interpolation(self, ctx: ModelContext, out_dir: str) -> dict[str, Any]:
    """`sample.interpolate` strips of `sample.per_prompt` images, each along the slerp between two random latents
    under one condition (the classes, or `sample.prompts`, in turn)."""
    s = self.config.sample
    strips, steps = int(s.interpolate), max(int(s.per_prompt), 2)
    prompts, labels = self._conditions(1)
    ends = np.asarray(self.latents(jax.random.key(int(s.seed)), 2 * strips, float(s.truncation)))
    weights = np.linspace(0.0, 1.0, steps)
    latents = np.concatenate([slerp(ends[2 * k], ends[2 * k + 1], weights) for k in range(strips)])
    which = [k % len(prompts) for k in range(strips) for _ in range(steps)]
    strip_labels = None if labels is None else labels[which]
    images = self.generate(ctx, [prompts[i] for i in which], int(s.seed), labels=strip_labels, latents=latents)
    if not ctx.is_main_process:
      return {}
    extra = [{"strip": k, "weight": float(w), "truncation": float(s.truncation),
              **({"label": int(labels[k % len(prompts)])} if labels is not None else {})}
             for k in range(strips) for w in weights]
    return image_io.save_samples(out_dir, images, [prompts[i] for i in which], grid_cols=steps, extra=extra)
