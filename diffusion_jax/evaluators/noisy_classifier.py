"""`noisy_accuracy`: a noise-aware classifier's held-out accuracy at fixed time steps (`timesteps`), with fixed noise
so evaluations compare across steps; metrics `noisy_accuracy_t<T>` and `noisy_accuracy` (their mean).
Options: timesteps, max_examples (0 = the whole split), seed."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.config import ConfigError
from diffusion_jax.train import evaluators


@evaluators.register("noisy_accuracy")
class NoisyAccuracy(evaluators.Evaluator):
  options = ("timesteps", "max_examples", "seed")

  def __init__(self, name, task, config, spec):
    super().__init__(name, task, config, spec)
    if not hasattr(task, "noised"):
      raise ConfigError(f"evals.{name}: a {config.task!r} task is not a noise-aware classifier")
    self.timesteps = tuple(int(t) for t in spec.timesteps)
    bad = [t for t in self.timesteps if not 0 <= t < task.schedule.num_timesteps]
    if not self.timesteps or bad:
      raise ConfigError(f"evals.{name}.timesteps must be in [0, {task.schedule.num_timesteps}), got "
                        f"{self.timesteps}")
    self.max_examples, self.seed = int(spec.max_examples), int(spec.seed)

  def _correct(self, model, batch, rng):
    out = {}
    for i, t in enumerate(self.timesteps):
      x_t, tt = self.task.noised(batch, jax.random.fold_in(rng, i), t)
      out[f"t{t}"] = (jnp.argmax(model(x_t, tt), axis=-1) == batch["label"]).astype(jnp.float32)
    return out

  def run(self, ctx):
    fn = ctx.jit(self._correct)
    counter = itertools.count()
    out = self.split_outputs(ctx, lambda batch: fn(batch, jax.random.key(self.seed * 100003 + next(counter))),
                             max_examples=self.max_examples)
    scores = {f"noisy_accuracy_t{t}": float(np.mean(out[f"t{t}"])) for t in self.timesteps}
    scores["noisy_accuracy"] = float(np.mean(list(scores.values())))
    return scores
