"""A task small enough to compile in seconds, for exercising the trainer itself.

It regresses the digit label from a noisy 8×8 image with a two-layer MLP; the noise comes from the step rng,
so a resumed run only matches an uninterrupted one if rng and data order are both restored exactly.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from diffusion_jax.defaults import base_config, evaluator, optimizer
from diffusion_jax.models import layers
from diffusion_jax.train import evaluators, parts
from diffusion_jax.train.task import Task, register


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


@evaluators.register("param_norm")
class ParamNorm(evaluators.Evaluator):
  """The squared norm of every parameter the evaluation sees (EMA where kept)."""

  def run(self, ctx):
    return {"param_norm": float(sum(jnp.sum(jnp.square(x)) for s in ctx.states for x in jax.tree.leaves(s)))}


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
  c.evals.norm = evaluator("param_norm")
  return _override(c, overrides)


def _override(c, overrides):
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  c.lock()
  return c


# ------------------------------------------------------------------ two players, several updates
class _MLP(nnx.Module):
  def __init__(self, sizes, *, rngs, batch_norm=False):
    # No bias before a BatchNorm: it would cancel, its gradient zero up to rounding noise that Adam scales up.
    self.layers = nnx.List([layers.dense(a, b, ("embed", "mlp"), rngs=rngs,
                                         use_bias=not batch_norm or i == len(sizes) - 2)
                            for i, (a, b) in enumerate(zip(sizes, sizes[1:]))])
    self.norms = nnx.List([nnx.BatchNorm(b, momentum=0.9, rngs=rngs) for b in sizes[1:-1]]) if batch_norm else None

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = self.norms[i](x) if self.norms is not None else x
        x = jax.nn.leaky_relu(x, 0.2)
    return x


class ToyGANModel(nnx.Module):
  def __init__(self, *, rngs, batch_norm=True):
    self.generator = _MLP((2, 32, 32, 2), rngs=rngs, batch_norm=batch_norm)  # batch statistics: mutable state
    self.critic = _MLP((2, 32, 32, 1), rngs=rngs)


def mixture(n: int, seed: int = 0):
  """Points of a ring of 8 Gaussians, the usual 2-D GAN toy."""
  rng = np.random.default_rng(seed)
  angle = 2 * np.pi * rng.integers(0, 8, n) / 8
  return (np.stack([np.cos(angle), np.sin(angle)], 1) * 2 + 0.05 * rng.standard_normal((n, 2))).astype(np.float32)


@register("toy_gan")
class ToyGAN(Task):
  """A non-saturating GAN on 2-D points: `toy.n_critic` critic updates (each on its own share of the batch) per
  generator update, two optimizer sections, EMA of the generator only. The generator's noise comes with the data,
  so a loss is a function of its batch (micro-batches then give the full batch's gradients)."""

  def build_model(self, rngs):
    return ToyGANModel(rngs=rngs, batch_norm=bool(self.config.toy.batch_norm))

  def updates(self):
    return (parts.Update("critic", self.critic_loss, params=parts.under("critic"), optimizer="critic_optim",
                         repeat=int(self.config.toy.n_critic), split_batch=True),
            parts.Update("generator", self.generator_loss, params=parts.under("generator")))

  def critic_loss(self, model, batch, rng):
    fake = model.generator(batch["noise"])
    real_logits, fake_logits = model.critic(batch["point"])[:, 0], model.critic(fake)[:, 0]
    loss = jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))
    return loss, {"real": jnp.mean(real_logits), "rows": jnp.float32(batch["point"].shape[0])}

  def generator_loss(self, model, batch, rng):
    fake = model.generator(batch["noise"][::-1])
    return jnp.mean(jax.nn.softplus(-model.critic(fake)[:, 0])), {}

  def check_run(self):
    """Its points are made in train_dataset."""

  def train_dataset(self, ctx, *, global_batch_size, seed):
    from diffusion_jax.data import pipeline
    points = mixture(512)
    noise = np.random.default_rng(1).standard_normal(points.shape).astype(np.float32)
    return pipeline.make_array_dataset({"point": points, "noise": noise, "valid": np.ones(len(points), np.float32)},
                                       global_batch_size=global_batch_size, seed=seed,
                                       process_index=jax.process_index(), process_count=jax.process_count())


def toy_gan_config(**overrides):
  c = base_config()
  c.task = "toy_gan"
  c.toy = ml_collections.ConfigDict(dict(n_critic=2, batch_norm=True))
  c.critic_optim = optimizer(lr=2e-3, b1=0.5, b2=0.9, warmup_steps=0, schedule="constant")
  c.optim.update(lr=1e-3, b1=0.5, b2=0.9, warmup_steps=0, schedule="constant")
  c.ema.update(decay=0.9, updates=("generator",))
  c.train.update(steps=6, batch_size=32, log_every=1, checkpoint_every=3, progress_bar=False, sample_at_end=False)
  return _override(c, overrides)


# ------------------------------------------------------------------ batch statistics
@register("toy_batchnorm")
class ToyBatchNorm(ToyRegression):
  """The toy regression with BatchNorm: its running statistics are mutable state, updated by every training step."""

  def build_model(self, rngs):
    d = self.config.data
    return _MLP((d.image_size * d.image_size * d.channels, 32, 1), rngs=rngs, batch_norm=True)

  def loss(self, model, batch, rng):
    x = (batch["image"] + 0.1 * jax.random.normal(rng, batch["image"].shape)).reshape(batch["image"].shape[0], -1)
    err = (model(x)[:, 0] - batch["label"].astype(jnp.float32) / 9.0) ** 2
    w = batch["valid"]
    return jnp.sum(err * w) / jnp.maximum(jnp.sum(w), 1.0), {}


@evaluators.register("first_prediction")
class FirstPrediction(evaluators.Evaluator):
  """The model's output for an all-ones input: in evaluation mode it depends on the running statistics only."""

  def predict(self, model, x):
    return model(x)

  def run(self, ctx):
    d = self.config.data
    x = jnp.ones((2, d.image_size * d.image_size * d.channels))
    return {"first_prediction": float(ctx.jit(self.predict)(x)[0, 0])}
