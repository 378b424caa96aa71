"""Image classification with a ViT (task='classify'): from scratch, fine-tuned from an MAE or CLIP run, or as a
linear probe on that run's frozen tower.

  classify.init_from     '' trains the tower from scratch; a workdir of a task='mae' or 'contrastive' run starts it
                         from that run's `vision_model` (its architecture too: the `model` tower fields are then
                         unused; MAE's fixed sin-cos positions become learned ones that start from them)
  classify.linear_probe  freeze the tower (random when init_from is ''): a BatchNorm without scale or offset and a
                         linear head on its pooled features, MAE's protocol
  classify.label_smoothing, classify.mixup / classify.cutmix (Beta(α, α) mixing of each batch with its reverse;
                         with both, each step picks one at random)
  model.pooling 'cls' | 'mean', model.pre_logits (0: none), model.drop_path (stochastic depth), and
  optim.layer_decay (layer-wise learning-rate decay, `train.optimizer.layer_decay`) for fine-tuning.

Rows with a negative label (unlabelled) weigh nothing. The `accuracy` evaluator reports held-out top-1 accuracy. A
classifier trained here is transformers' `ViTForImageClassification` layout when its pooling is 'cls' without
pre-logits or probe: `pretrained.vit.save_transformers` exports it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from diffusion_jax.config import ConfigError
from diffusion_jax.models.vit import CLIPVisionConfig, ViTClassifier
from diffusion_jax.tasks.mae import vision_config
from diffusion_jax.train import parts, runs
from diffusion_jax.train.task import Task, register


def tower_of_run(source: runs.RunSource) -> CLIPVisionConfig:
  """The ViT tower config of a finished MAE or contrastive run."""
  task = source.task()
  cfg = task.model_config
  return cfg.encoder if source.config().task == "mae" else cfg.vision


def mix(images: jax.Array, targets: jax.Array, rng: jax.Array, mixup: float, cutmix: float
        ) -> tuple[jax.Array, jax.Array]:
  """Mixup or CutMix of a batch with itself reversed (timm's pairing): λ ~ Beta(α, α) of the one drawn (each with
  probability ½ when both α > 0); CutMix pastes a box of area 1 − λ and re-weighs the targets by the pasted area."""
  if not (mixup or cutmix):
    return images, targets
  rng_pick, rng_lam, rng_box = jax.random.split(rng, 3)
  use_cutmix = jax.random.bernoulli(rng_pick, 0.5) if (mixup and cutmix) else jnp.asarray(bool(cutmix))
  alpha = jnp.where(use_cutmix, cutmix or 1.0, mixup or 1.0)
  lam = jax.random.beta(rng_lam, alpha, alpha)
  other, other_t = images[::-1], targets[::-1]
  h, w = images.shape[1:3]
  cy, cx = jax.random.uniform(rng_box, (2,)) * jnp.array([h, w])
  half_h, half_w = h * jnp.sqrt(1 - lam) / 2, w * jnp.sqrt(1 - lam) / 2
  y0, y1 = jnp.clip(jnp.round(cy - half_h), 0, h), jnp.clip(jnp.round(cy + half_h), 0, h)
  x0, x1 = jnp.clip(jnp.round(cx - half_w), 0, w), jnp.clip(jnp.round(cx + half_w), 0, w)
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  box = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))[None, :, :, None]
  box_lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
  mixed = jnp.where(use_cutmix, jnp.where(box, other, images), lam * images + (1 - lam) * other)
  lam = jnp.where(use_cutmix, box_lam, lam)
  return mixed.astype(images.dtype), lam * targets + (1 - lam) * other_t


@register("classify")
class ClassifyTask(Task):

  def __init__(self, config):
    super().__init__(config)
    m, c = config.model, config.classify
    self.num_classes = int(m.num_classes) or len(config.data.class_names)
    if self.num_classes < 2:
      raise ConfigError("task='classify' needs model.num_classes >= 2 or data.class_names")
    for name in ("label_smoothing", "mixup", "cutmix"):
      if float(c[name]) < 0 or (name == "label_smoothing" and float(c[name]) >= 1):
        raise ConfigError(f"classify.{name} must be >= 0{' and < 1' if name == 'label_smoothing' else ''}, "
                          f"got {c[name]}")
    self.probe = bool(c.linear_probe)
    drop_path = 0.0 if self.probe else float(m.drop_path)
    self.init_source = None
    if c.init_from:
      self.init_source = runs.RunSource("classify.init_from", c.init_from, task=("mae", "contrastive"),
                                        select=("vision_model",), frozen=self.probe)
      tower = tower_of_run(self.init_source)
      if (tower.image_size, tower.channels) != (config.data.image_size, config.data.channels):
        raise ConfigError(f"classify.init_from={c.init_from!r} was trained on {tower.image_size}px images with "
                          f"{tower.channels} channels; data.image_size/channels say {config.data.image_size}/"
                          f"{config.data.channels}")
      self.tower = dataclasses.replace(tower, fixed_positions=False, drop_path=drop_path)
    else:
      self.tower = vision_config(config, pooling="cls", pre_norm=False, patch_bias=True, layer_norm_eps=1e-6,
                                 drop_path=drop_path)

  def build_model(self, rngs: nnx.Rngs) -> ViTClassifier:
    m = self.config.model
    try:
      return ViTClassifier(self.tower, self.num_classes, pooling=m.pooling, pre_logits=int(m.pre_logits),
                           probe=self.probe, rngs=rngs)
    except ValueError as e:
      raise ConfigError(f"model: {e}") from None

  def frozen(self):
    return parts.under("vision_model") if self.probe else nnx.Nothing()

  def weight_sources(self):
    return [self.init_source] if self.init_source is not None else []

  def loss(self, model: ViTClassifier, batch, rng):
    c = self.config.classify
    labels = batch["label"]
    weights = batch["valid"] * (labels >= 0)
    targets = optax.smooth_labels(jax.nn.one_hot(jnp.maximum(labels, 0), self.num_classes),
                                  float(c.label_smoothing))
    rng_mix, rng_drop = jax.random.split(rng)
    images, targets = mix(batch["image"], targets, rng_mix, float(c.mixup), float(c.cutmix))
    logits = model(images, rng=rng_drop)
    total = jnp.maximum(jnp.sum(weights), 1.0)
    ce = optax.softmax_cross_entropy(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return jnp.sum(ce * weights) / total, {"accuracy": jnp.sum(correct * weights) / total}

  def logits(self, model: ViTClassifier, images: jax.Array) -> jax.Array:
    return model(images)
