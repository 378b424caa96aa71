"""`accuracy`: a classifier's held-out top-1 (and top-5 with more than five classes) accuracy and mean negative
log-likelihood over the eval split (`tasks.classify`). Options: max_examples (0 = all). Metrics: accuracy[,
top5_accuracy], nll, examples.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.config import ConfigError
from diffusion_jax.train import evaluators


@evaluators.register("accuracy")
class Accuracy(evaluators.Evaluator):
  options = ("max_examples",)

  def __init__(self, name, task, config, spec):
    super().__init__(name, task, config, spec)
    if not hasattr(task, "logits"):
      raise ConfigError(f"evals.{name}: accuracy needs a classifier (task='classify'), not task={config.task!r}")

  def _scores(self, model, images, labels):
    logits = self.task.logits(model, images)
    rank = jnp.sum(logits > jnp.take_along_axis(logits, jnp.maximum(labels, 0)[:, None], axis=1), axis=1)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.maximum(labels, 0)[:, None], axis=1)[:, 0]
    return {"rank": rank, "nll": nll, "label": labels}

  def run(self, ctx):
    fn = ctx.jit(self._scores)
    got = self.split_outputs(ctx, lambda batch: fn(batch["image"], batch["label"]),
                             max_examples=int(self.spec.max_examples))
    labelled = got["label"] >= 0
    if not labelled.any():
      raise ConfigError(f"evals.{self.name}: split {self.split!r} has no labelled example")
    rank, nll = got["rank"][labelled], got["nll"][labelled]
    out = {"accuracy": float(np.mean(rank == 0)), "nll": float(np.mean(nll)), "examples": float(labelled.sum())}
    if self.task.num_classes > 5:
      out["top5_accuracy"] = float(np.mean(rank < 5))
    return out
