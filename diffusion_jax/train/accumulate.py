"""Gradient accumulation: one optimizer step over several micro-batches, inside the jitted train step.

`train.grad_accum_steps = n` splits the global batch of B examples into n micro-batches of B/n; a `lax.scan` runs
forward and backward on one at a time, so activations are held for B/n examples while the step still sees B.

Micro-batch k takes rows k, k+n, k+2n, …: each device's contiguous shard of the batch then holds its own share of
every micro-batch, and no example moves between devices. Every task's loss is a mean over examples weighted by
`batch['valid']` (padding rows weigh 0), so the full-batch loss is the micro-batch losses weighted by their valid
counts; gradients and metrics are combined with the same weights, and metrics named 'count/…' (totals) are summed.
A loss that couples the examples of a batch (contrastive, over all pairs) is not such a mean; its task refuses
accumulation. Scalars in the batch (the trainer's `step`) go to every micro-batch whole.

Micro-batch k draws its randomness from `fold_in(rng, k)`: the same distribution as one big batch, not the same
numbers. A deterministic loss gives the full batch's gradients to float rounding.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from diffusion_jax.config import ConfigError


def check_divisible(batch_size: int, steps: int, batch_shards: int) -> None:
  """A one-line ConfigError unless the batch splits into `steps` micro-batches that each fill every batch shard."""
  if steps < 1:
    raise ConfigError(f"train.grad_accum_steps must be >= 1, got {steps}")
  if batch_size % steps or (batch_size // steps) % batch_shards:
    raise ConfigError(f"train.batch_size={batch_size} must split into train.grad_accum_steps={steps} micro-batches "
                      f"whose size is a multiple of the {batch_shards} batch shards of the mesh")


def value_and_grad(loss_fn: Callable, steps: int, batch_sharding: Optional[NamedSharding] = None) -> Callable:
  """`jax.value_and_grad(loss_fn, has_aux=True)` for `loss_fn(params, mutable, batch, rng) -> (loss, (metrics,
  mutable))`, computed over `steps` micro-batches of `batch`; `batch_sharding` (of the batch's leading axis) keeps
  micro-batches sharded alike. Mutable state (batch statistics) passes from one micro-batch to the next.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if steps == 1:
    return grad_fn

  def micro_step(params, mutable, batch, rng):
    """Loss, metrics and gradients of one micro-batch, each multiplied by its weight (its valid count)."""
    (loss, (metrics, mutable)), grads = grad_fn(params, mutable, batch, rng)
    weight = _weight(batch)
    scale = lambda x: jnp.where(weight > 0, x * weight, 0).astype(x.dtype)  # an empty micro-batch adds nothing
    metrics = {k: jnp.asarray(v, jnp.float32) if k.startswith("count/") else scale(jnp.asarray(v, jnp.float32))
               for k, v in metrics.items()}
    return (weight, scale(jnp.asarray(loss, jnp.float32)), metrics, jax.tree.map(scale, grads)), mutable

  def accumulated(params, mutable, batch, rng):
    shared = {k: v for k, v in batch.items() if jnp.ndim(v) == 0}
    micro = {k: _split(k, v, steps, batch_sharding) for k, v in batch.items() if jnp.ndim(v) > 0}

    def body(carry, xs):
      totals, mutable = carry
      k, micro_batch = xs
      out, mutable = micro_step(params, mutable, dict(micro_batch, **shared), jax.random.fold_in(rng, k))
      return (jax.tree.map(jnp.add, totals, out), mutable), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes, _ = jax.eval_shape(micro_step, params, mutable, dict(first, **shared), rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    ((weight, loss, metrics, grads), mutable), _ = jax.lax.scan(body, (zeros, mutable), (jnp.arange(steps), micro))
    # Integer valid counts make a non-empty batch weigh >= 1; an all-padding batch gives zeros, as the tasks do.
    mean = lambda x: (x / jnp.maximum(weight, 1e-12)).astype(x.dtype)
    metrics = {k: v if k.startswith("count/") else mean(v) for k, v in metrics.items()}
    return (mean(loss), (metrics, mutable)), jax.tree.map(mean, grads)

  return accumulated


def split_rows(batch: dict, parts: int, batch_sharding: Optional[NamedSharding] = None) -> dict:
  """The batch's arrays as [parts, B/parts, ...] (part k = rows k, k+parts, …); scalars stay whole."""
  return {k: _split(k, v, parts, batch_sharding) if jnp.ndim(v) > 0 else v for k, v in batch.items()}


def _weight(batch) -> jax.Array:
  if "valid" in batch:
    return jnp.sum(batch["valid"].astype(jnp.float32))
  return jnp.asarray(next(v for v in batch.values() if jnp.ndim(v) > 0).shape[0], jnp.float32)


def _split(name: str, x: jax.Array, steps: int, batch_sharding: Optional[NamedSharding]) -> jax.Array:
  """[B, …] → [steps, B/steps, …] with micro-batch k = rows k, k+steps, …, sharded along its second axis."""
  if x.shape[0] % steps:
    raise ValueError(f"batch[{name!r}] has leading dimension {x.shape[0]}, not divisible by {steps} micro-batches")
  x = jnp.swapaxes(x.reshape(x.shape[0] // steps, steps, *x.shape[1:]), 0, 1)
  if batch_sharding is not None:
    x = jax.lax.with_sharding_constraint(x, NamedSharding(batch_sharding.mesh, P(None, *batch_sharding.spec)))
  return x
