"""`loss`: a task update's training loss on held-out batches, with fixed randomness so evaluations compare across
steps. Options: batches (0 = the whole split), update_name ('' = the task's first update), key (metric name)."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.config import ConfigError
from diffusion_jax.train import evaluators


@evaluators.register("loss")
class Loss(evaluators.Evaluator):
  options = ("batches", "update_name", "key")

  def __init__(self, name, task, config, spec):
    super().__init__(name, task, config, spec)
    updates = {u.name: u for u in task.updates()}
    wanted = spec.update_name or next(iter(updates))
    if wanted not in updates:
      raise ConfigError(f"evals.{name}.update_name={wanted!r} is not an update of this task ({list(updates)})")
    self.update = updates[wanted]
    self.batches = int(spec.batches)
    self.key = spec.key or "loss"

  def _loss(self, model, batch, rng):
    loss, _ = self.update.loss(model, batch, rng)
    return {"loss": jnp.full(batch["valid"].shape, loss)}  # per row, so the padded last batch weighs its rows

  def run(self, ctx):
    fn = ctx.jit(self._loss)
    index = itertools.count()
    out = self.split_outputs(ctx, lambda batch: fn(batch, jax.random.key(1000 + next(index))),
                             max_batches=self.batches)
    return {self.key: float(np.mean(out["loss"]))} if len(out.get("loss", ())) else {}
