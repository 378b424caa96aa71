"""unCLIP's evaluators.

`prior_health`: the design documents' check of an unCLIP prior on held-out caption–image pairs.

Metrics: prior_cosine (sampled image embedding vs the true one), text_image_cosine (the caption's own CLIP text
embedding vs the true image embedding: what feeding the text embedding instead would give), unrelated_cosine (the
prior's embedding for another digit's caption vs the true one), and with class names prior_zero_shot /
image_zero_shot (CLIP zero-shot accuracy of the sampled / the true image embeddings). Options: max_examples, seed.

`variations`: DALL-E 2's image variations of an unCLIP decoder (`tasks.unclip_decoder.variation_scores`): per_image
variations of each held-out image (max_examples; 0 = all) decoded from its CLIP image embedding through the decoder
and its upsamplers. Metrics: variation_similarity (CLIP image-image cosine of a variation to its source),
random_pair_similarity (of two distinct held-out images: the baseline), variation_to_others (of a variation to the
other sources), variation_source_top1 (the share of variations whose nearest held-out image is their source; chance is
1 / examples), examples. The CLIP is the decoder's own frozen one, so it is not an independent judge.
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


@evaluators.register("variations")
class Variations(evaluators.Evaluator):
  options = ("max_examples", "per_image", "seed")

  def __init__(self, name, task, config, spec):
    super().__init__(name, task, config, spec)
    if not hasattr(task, "variation_scores"):
      raise ConfigError(f"evals.{name}: variations evaluates an unCLIP decoder (unclip_decoder), not a "
                        f"{config.task!r} task")
    if int(spec.per_image) < 1:
      raise ConfigError(f"evals.{name}.per_image={spec.per_image} must be at least 1")

  def run(self, ctx):
    images = self.task.heldout_images(ctx, int(self.spec.max_examples), split=self.split,
                                      batch_size=self.batch_size)
    return self.task.variation_scores(ctx, images, int(self.spec.per_image), int(self.spec.seed))
