"""A task small enough to compile in seconds, for exercising the trainer itself.

It regresses the digit label from a noisy 8×8 image with a two-layer MLP; the noise comes from the step rng,
so a resumed run only matches an uninterrupted one if rng and data order are both restored exactly.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.defaults import base_config
from diffusion_jax.models import layers
from diffusion_jax.tasks.base import Task, register


class ToyModel(nnx.Module):
  def __init__(self, features: int, *, rngs: nnx.Rngs):
    self.fc1 = layers.dense(features, 32, ("embed", "mlp"), rngs=rngs)
    self.fc2 = layers.dense(32, 1, ("mlp", "embed"), rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x.reshape(x.shape[0], -1))))[:, 0]


@register("toy_regression")
class ToyRegression(Task):

  def build_model(self, rngs):
    d = self.config.data
    return ToyModel(d.image_size * d.image_size * d.channels, rngs=rngs)

  def loss(self, model, batch, rng):
    x = batch["image"] + 0.1 * jax.random.normal(rng, batch["image"].shape)
    err = (model(x) - batch["label"].astype(jnp.float32) / 9.0) ** 2
    w = batch["valid"]
    return jnp.sum(err * w) / jnp.maximum(jnp.sum(w), 1.0), {"count/skipped_examples": jnp.sum(1.0 - w)}

  def evaluate(self, ctx):
    return {"eval/param_norm": float(sum(jnp.sum(p ** 2) for p in jax.tree.leaves(ctx.params)))}


def toy_config(**overrides):
  c = base_config()
  c.task = "toy_regression"
  c.data.image_size = 8
  c.train.steps = 6
  c.train.batch_size = 16
  c.train.log_every = 1
  c.train.checkpoint_every = 3
  c.train.progress_bar = False
  c.optim.warmup_steps = 2
  c.ema.decay = 0.9
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  c.lock()
  return c
