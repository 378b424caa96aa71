"""`prior_health`: the design documents' check of an unCLIP prior on held-out caption–image pairs.

Metrics: prior_cosine (sampled image embedding vs the true one), text_image_cosine (the caption's own CLIP text
embedding vs the true image embedding: what feeding the text embedding instead would give), unrelated_cosine (the
prior's embedding for another digit's caption vs the true one), and with class names prior_zero_shot /
image_zero_shot (CLIP zero-shot accuracy of the sampled / the true image embeddings). Options: max_examples, seed.
"""
from __future__ import annotations

from diffusion_jax.config import ConfigError
from diffusion_jax.train import evaluators


@evaluators.register("prior_health")
class PriorHealth(evaluators.Evaluator):
  options = ("max_examples", "seed")

  def __init__(self, name, task, config, spec):
    super().__init__(name, task, config, spec)
    if not hasattr(task, "health"):
      raise ConfigError(f"evals.{name}: prior_health evaluates an unCLIP prior (unclip_prior, unclip_ar_prior), not a "
                        f"{config.task!r} task")

  def run(self, ctx):
    return self.task.health(ctx, self.split, self.batch_size, int(self.spec.max_examples), int(self.spec.seed))
