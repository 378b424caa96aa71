"""`concept`: does a concept fine-tune (`tasks.concept`) draw its subject when prompted for it?

Judged in the penultimate features of the independent MNIST classifier (`eval.digit_classifier`), as DreamBooth
judges subject fidelity in DINO's: `num_samples` images of `prompt` (default concept.prompt) are compared with the
subject's training images.
  <key>_similarity          mean cosine similarity of a sample's features to each subject image's
  <key>_rate                share of samples nearest (Euclidean) to the subject's mean feature among it and the ten
                            digits' means over the MNIST test split: an 11-way nearest-centroid judge
References on the same scales, from real images: <key>_similarity_subject (between the subject's own images, each
pair once), <key>_similarity_digits and <key>_rate_digits (for 1,000 real test digits: the judge's false alarms).
"""
from __future__ import annotations

import numpy as np

from diffusion_jax.config import ConfigError
from diffusion_jax.eval import digit_classifier
from diffusion_jax.train import evaluators

REAL_DIGITS = 1000


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def similarity(features: np.ndarray, subject: np.ndarray) -> float:
  """Mean cosine similarity between every row of `features` and every row of `subject`."""
  return float(np.mean(_unit(features) @ _unit(subject).T))


def nearest(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
  """Index of each row's nearest centroid (Euclidean)."""
  d = ((features[:, None, :] - centroids[None]) ** 2).sum(-1)
  return np.argmin(d, axis=-1)


@evaluators.register("concept")
class ConceptFidelity(evaluators.Evaluator):
  options = ("prompt", "num_samples", "seed", "guidance_scale", "classifier_cache_dir", "key")

  def __init__(self, name, task, config, spec):
    super().__init__(name, task, config, spec)
    if not hasattr(task, "concept_images"):
      raise ConfigError(f"evals.{name}: the concept evaluator judges task='concept' runs, not {config.task!r}")
    self.prompt = spec.prompt or config.concept.prompt
    self.num_samples, self.seed = int(spec.num_samples), int(spec.seed)
    if self.num_samples <= 0:
      raise ConfigError(f"evals.{name}.num_samples must be positive")
    self.guidance_scale = float(spec.guidance_scale) or None
    self.key = spec.key or "concept"
    self._cache_dir = spec.classifier_cache_dir or None
    self._reference = None

  def reference(self) -> dict:
    """The judge, the subject's features, the eleven centroids and the real-image reference figures (once)."""
    if self._reference is None:
      judge = digit_classifier.load_or_train(self._cache_dir)
      subject = judge.features(self.task.concept_images())
      test, labels = judge.test_features()
      centroids = np.stack([test[labels == c].mean(0) for c in range(10)] + [subject.mean(0)])
      digits = test[:REAL_DIGITS]
      pairs = _unit(subject) @ _unit(subject).T
      k = self.key
      self._reference = {"judge": judge, "subject": subject, "centroids": centroids, "figures": {
          f"{k}_similarity_subject": float(pairs[np.triu_indices(len(subject), 1)].mean()) if len(subject) > 1
          else 1.0,
          f"{k}_similarity_digits": similarity(digits, subject),
          f"{k}_rate_digits": float(np.mean(nearest(digits, centroids) == 10))}}
    return self._reference

  def run(self, ctx):
    ref = self.reference()
    images = self.task.generate(ctx, [self.prompt] * self.num_samples, self.seed, guidance_scale=self.guidance_scale)
    features = ref["judge"].features(images)
    return {f"{self.key}_similarity": similarity(features, ref["subject"]),
            f"{self.key}_rate": float(np.mean(nearest(features, ref["centroids"]) == 10)), **ref["figures"]}
