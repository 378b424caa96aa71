"""`image_nll`: a DALL-E transformer's (`tasks.dalle`) exact negative log-likelihood of the eval split's image codes
given their captions, in bits per image token and bits per image dimension (the same total over the H·W·C pixels the
codes stand for; a lossy tokenizer's, so not comparable with pixel likelihoods). Options: max_examples (0 = all).
Metrics: image_nll_bits_per_token, image_nll_bits_per_dim, image_nll_nats (per image), image_nll_examples.

`elbo`: a VAE's (`tasks.vae`) likelihood bounds on the eval split, in nats per image and bits per dimension.

What the nats are of: for a Bernoulli VAE, the test images binarized once with a fixed seed, b ~ Bernoulli((x + 1)/2)
drawn per image from a key of `seed` and the image's index, so every evaluation and batch size scores the same binary
test set (a stochastic binarization, as the dynamically binarized MNIST benchmarks use, though not their fixed
file); for a Gaussian VAE, the 8-bit test images under its discretized Gaussian, a probability over the 256 levels,
so bits/dim are those of 8-bit pixels. A conditional VAE's bounds are on log p(x | y), the test image's true label y
given; with a uniform label prior, -log p(x) <= -log p(x | y) + log 10, so the same model's unconditional number is
at most 2.3 nats higher. D = image_size² · channels (784 for MNIST at 28 px).

Options: importance_samples (K ≥ 1, e.g. 100 for a reported number), max_examples (0 = the whole split), seed.
Metrics (means over the images):
  neg_elbo, neg_elbo_bits_per_dim      -ELBO = reconstruction_nats + kl_nats (β = 1 whatever vae.beta trained with)
  iwae_nll, iwae_bits_per_dim          -log (1/K) Σ_k p(x, z_k) / q(z_k|x): an upper bound on -log p(x), tighter
                                       than -ELBO in expectation, approaching -log p(x) as K grows (Burda et al. 2016)
  reconstruction_nats                  E_q[-log p(x|z)], estimated by the K samples
  kl_nats                              KL(q(z|x) ‖ N(0, I)), closed form
  elbo_examples                        images scored
bits/dim = nats / (D · ln 2).
"""
from __future__ import annotations

import itertools

import numpy as np

from diffusion_jax.config import ConfigError
from diffusion_jax.models import likelihoods
from diffusion_jax.train import evaluators


@evaluators.register("elbo")
class ELBO(evaluators.Evaluator):
  options = ("importance_samples", "max_examples", "seed")

  def __init__(self, name, task, config, spec):
    super().__init__(name, task, config, spec)
    if not hasattr(task, "bounds"):
      raise ConfigError(f"evals.{name}: a {config.task!r} task has no likelihood bounds (task='vae' has)")
    self.samples = int(spec.importance_samples)
    if self.samples < 1:
      raise ConfigError(f"evals.{name}.importance_samples must be >= 1, got {self.samples}")
    self.seed = int(spec.seed)

  def _bounds(self, model, batch, index, seed):
    return self.task.bounds(model, batch, index, seed, self.samples)

  def run(self, ctx):
    fn = ctx.jit(self._bounds)
    starts = itertools.count(0, self.batch_size)

    def one(batch):
      index = np.arange(self.batch_size, dtype=np.int32) + next(starts)
      return fn({"image": batch["image"], "label": batch["label"]}, index, np.int32(self.seed))

    out = self.split_outputs(ctx, one, max_examples=int(self.spec.max_examples))
    if not len(out.get("neg_elbo", ())):
      return {}
    nats = {k: float(np.mean(v, dtype=np.float64)) for k, v in out.items()}
    dims = self.task.dims
    bpd = lambda key: float(likelihoods.bits_per_dim(nats[key], dims))
    return {"neg_elbo": nats["neg_elbo"], "neg_elbo_bits_per_dim": bpd("neg_elbo"),
            "iwae_nll": nats["iwae_nll"], "iwae_bits_per_dim": bpd("iwae_nll"),
            "reconstruction_nats": nats["reconstruction"], "kl_nats": nats["kl"],
            "elbo_examples": float(len(out["neg_elbo"]))}


@evaluators.register("image_nll")
class ImageNLL(evaluators.Evaluator):
  options = ("max_examples",)

  def __init__(self, name, task, config, spec):
    super().__init__(name, task, config, spec)
    if not hasattr(task, "image_nll"):
      raise ConfigError(f"evals.{name}: a {config.task!r} task has no image-token likelihood (task='dalle' has)")

  def run(self, ctx):
    fn = ctx.jit(lambda model, image, tokens: self.task.image_nll(model, image, tokens), key=(self, "nll"))
    out = self.split_outputs(ctx, lambda batch: {"nats": fn(batch["image"], batch["tokens"])},
                             max_examples=int(self.spec.max_examples))
    nats = float(np.mean(out["nats"], dtype=np.float64))
    d = self.config.data
    tokens, dims = self.task.model_config.image_len, d.image_size ** 2 * d.channels
    return {"image_nll_nats": nats, "image_nll_bits_per_token": nats / (tokens * np.log(2)),
            "image_nll_bits_per_dim": nats / (dims * np.log(2)), "image_nll_examples": float(len(out["nats"]))}
