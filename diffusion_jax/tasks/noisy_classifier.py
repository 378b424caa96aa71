"""A noise-aware classifier p(y | x_t, t) on the trainer: the image of a labelled batch is noised to a uniform time
step of `diffusion.*`'s schedule and classified by `models.noisy_classifier` (ADM's encoder half of the U-Net). A
finished run guides any unconditional (or conditional) diffusion run with the same schedule to a class:
`sample.classifier_guidance.workdir` and `.scale` (`diffusion.gradient_guidance`, `tasks.guides`).

Config: `model.*` the U-Net's encoder fields (block_out_channels, layers_per_block, attention_levels,
num_attention_heads, norm_num_groups); `model.num_classes` 0 = len(data.class_names); `diffusion.schedule`,
`num_timesteps`, `beta_start`, `beta_end` as the diffusion run it will guide. Its evaluator `noisy_accuracy` reports
the held-out accuracy at chosen time steps (`evaluators.noisy_classifier`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from diffusion_jax.config import ConfigError, compute_dtype
from diffusion_jax.diffusion import schedules
from diffusion_jax.models import remat
from diffusion_jax.models.noisy_classifier import NoisyClassifier
from diffusion_jax.models.unet import UNetConfig
from diffusion_jax.train.task import Task, register


def schedule_of(config) -> schedules.NoiseSchedule:
  d = config.diffusion
  return schedules.NoiseSchedule.create(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)


@register("noisy_classifier")
class NoisyClassifierTask(Task):

  def __init__(self, config):
    super().__init__(config)
    m = config.model
    self.num_classes = int(m.num_classes) or len(config.data.class_names)
    if self.num_classes < 2:
      raise ConfigError("task='noisy_classifier' needs model.num_classes >= 2 or data.class_names")
    self.schedule = schedule_of(config)

  def unet_config(self) -> UNetConfig:
    m = self.config.model
    return UNetConfig(
        in_channels=int(self.config.data.channels), block_out_channels=tuple(m.block_out_channels),
        layers_per_block=m.layers_per_block, attention_levels=tuple(m.attention_levels),
        mid_block_attention=m.mid_block_attention, num_attention_heads=m.num_attention_heads,
        cross_attention_dim=None, norm_num_groups=m.norm_num_groups, resnet_time_scale_shift="scale_shift",
        dtype=compute_dtype(m.compute_dtype), remat=remat.from_config(m), encoder_only=True)

  def build_model(self, rngs: nnx.Rngs) -> NoisyClassifier:
    return NoisyClassifier(self.unet_config(), self.num_classes, rngs=rngs)

  def noised(self, batch, rng, t=None):
    """(x_t, t) of the batch's images at uniform time steps (or the given ones)."""
    x0 = batch["image"]
    rng_t, rng_noise = jax.random.split(rng)
    if t is None:
      t = jax.random.randint(rng_t, (x0.shape[0],), 0, self.schedule.num_timesteps)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x0.shape[0],))
    return schedules.q_sample(self.schedule, x0, t, jax.random.normal(rng_noise, x0.shape, x0.dtype)), t

  def loss(self, model, batch, rng):
    x_t, t = self.noised(batch, rng)
    logits = model(x_t, t)
    labels = batch["label"]
    # Unlabelled rows (label < 0) and padding weigh nothing.
    weights = batch["valid"] * (labels >= 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    total = jnp.maximum(jnp.sum(weights), 1.0)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return jnp.sum(ce * weights) / total, {"accuracy": jnp.sum(correct * weights) / total}
