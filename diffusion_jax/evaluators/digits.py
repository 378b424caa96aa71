"""`digit_accuracy`: the share of generated digits that the independent MNIST classifier (`eval.digit_classifier`)
labels as the digit they were prompted with.

Options: per_class (samples per digit), templates (caption templates to prompt with; () = the first training
template), heldout (True: the templates must not be training templates), key (metric name), seed,
guidance_scale (0 = sample.guidance_scale), classifier_cache_dir ('' = the default cache), clip_score (also report
`<key>_clip_score`, for tasks with `clip_score(ctx, images, prompts)`: unCLIP's decoder), clip_workdir (also report
`<key>_clip_score` by this finished contrastive run, for any task: `evaluators.clip_scorer`), frechet (also report
`<key>_frechet`: the Fréchet distance between the samples and the MNIST test split in the classifier's penultimate
features, `eval.frechet`), diversity (also report `<key>_diversity`: the mean feature distance between two samples
of one digit), candidates (> 0: images a reranking task, `tasks.dalle`, draws per prompt before keeping its CLIP's
best; 1: no reranking; 0: the task's default). Both Fréchet and diversity come with the same figure for as many real test digits per class (`<key>_frechet_real`,
`<key>_diversity_real`): real handwriting at that sample count, a reference rather than a bound (at 500 samples the
distance is mostly estimation noise, and a generator can score below it).
Metrics with one template: `<key>` and `<key>_<digit>`; with several: `<key>` (their mean) and `<key>_<i>` per
template; the Fréchet and diversity figures are means over templates. The task must offer
`label_prompts(per_class, template)` and `generate(ctx, prompts, seed, labels=...,
guidance_scale=...)`.
"""
from __future__ import annotations

import numpy as np
from absl import logging

from diffusion_jax.config import ConfigError
from diffusion_jax.eval import digit_classifier, frechet
from diffusion_jax.evaluators import clip_scorer
from diffusion_jax.train import evaluators


@evaluators.register("digit_accuracy")
class DigitAccuracy(evaluators.Evaluator):
  options = ("per_class", "templates", "heldout", "key", "seed", "guidance_scale", "classifier_cache_dir",
             "clip_score", "clip_workdir", "frechet", "diversity", "candidates")

  def __init__(self, name, task, config, spec):
    super().__init__(name, task, config, spec)
    if not hasattr(task, "generate"):
      raise ConfigError(f"evals.{name}: a {config.task!r} task does not generate images")
    self.per_class = int(spec.per_class)
    self.templates = tuple(spec.templates) or ("",)
    self.key = spec.key or "digit_accuracy"
    self.seed = int(spec.seed)
    self.guidance_scale = float(spec.guidance_scale) or None
    self.options = {"candidates": int(spec.candidates)} if spec.candidates else {}
    if spec.candidates and not hasattr(task, "reranks"):
      raise ConfigError(f"evals.{name}.candidates: a {config.task!r} task does not rerank its samples")
    if spec.heldout:
      trained = set(config.data.caption_templates)
      for template in self.templates:
        if not template or template in trained:
          raise ConfigError(f"evals.{name}.templates: {template!r} is one of data.caption_templates, so not held out")
    self._judge = None
    self._cache_dir = spec.classifier_cache_dir or None
    self.clip_score = bool(spec.clip_score)
    if self.clip_score and not hasattr(task, "clip_score"):
      raise ConfigError(f"evals.{name}.clip_score: a {config.task!r} task has no CLIP towers to score with; give "
                        f"evals.{name}.clip_workdir instead")
    self._clip = None
    if spec.clip_workdir:
      if self.clip_score:
        raise ConfigError(f"evals.{name}: clip_score and clip_workdir both name the CLIP to score with; choose one")
      self._clip = clip_scorer.ClipScorer(spec.clip_workdir, f"evals.{name}.clip_workdir")
      self.clip_score = True
    self.frechet, self.diversity = bool(spec.frechet), bool(spec.diversity)
    self._test_moments = None
    if self.diversity and self.per_class < 2:
      raise ConfigError(f"evals.{name}.diversity compares samples of one digit, so per_class must be >= 2 (got "
                        f"{self.per_class}); or set diversity=False")

  def judge(self):
    if self._judge is None:
      self._judge = digit_classifier.load_or_train(self._cache_dir)
    return self._judge

  def feature_scores(self, images, labels) -> dict[str, float]:
    """Fréchet distance and diversity of `images` and of as many real test digits with the same labels."""
    if not (self.frechet or self.diversity):
      return {}
    judge = self.judge()
    test_features, test_labels = judge.test_features()
    real = real_like(test_labels, labels)
    features = judge.features(images)
    scores = {}
    if self.frechet:
      if self._test_moments is None:  # the 10,000 × 256 covariance, once per evaluator rather than twice per call
        self._test_moments = frechet.moments(test_features)
      scores["frechet"] = frechet.frechet_distance(*frechet.moments(features), *self._test_moments)
      scores["frechet_real"] = frechet.frechet_distance(*frechet.moments(test_features[real]), *self._test_moments)
    if self.diversity:
      scores["diversity"] = frechet.within_class_diversity(features, labels)
      scores["diversity_real"] = frechet.within_class_diversity(test_features[real], test_labels[real])
    return scores

  def run(self, ctx):
    results = []
    for template in self.templates:
      prompts, labels = self.task.label_prompts(self.per_class, template)
      images = self.task.generate(ctx, prompts, self.seed, labels=labels, guidance_scale=self.guidance_scale,
                                  **self.options)
      results.append(digit_classifier.accuracy(self.judge(), images, labels))
      if self._clip is not None:
        results[-1]["clip_score"] = self._clip.score(images, prompts)
      elif self.clip_score:
        results[-1]["clip_score"] = self.task.clip_score(ctx, images, prompts)
      results[-1].update(self.feature_scores(images, labels))
      logging.info("digit accuracy %.4f over %d samples like %r", results[-1]["accuracy"], len(labels), prompts[0])
    names = [n for n, on in (("clip_score", self.clip_score), ("frechet", self.frechet),
                             ("frechet_real", self.frechet), ("diversity", self.diversity),
                             ("diversity_real", self.diversity)) if on]
    scores = {f"{self.key}_{n}": float(np.mean([r[n] for r in results])) for n in names}
    if len(results) == 1:
      out = {self.key: results[0]["accuracy"], **scores}
      out.update({f"{self.key}_{c}": a for c, a in enumerate(results[0]["per_class"])})
      return out
    out = {self.key: float(np.mean([r["accuracy"] for r in results])), **scores}
    out.update({f"{self.key}_{i}": r["accuracy"] for i, r in enumerate(results)})
    return out


def real_like(real_labels: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Indices of the first real examples with the multiset of `labels` (so a class-balanced sample gets a
  class-balanced real reference of the same size)."""
  picked = []
  for c, count in zip(*np.unique(labels, return_counts=True)):
    idx = np.flatnonzero(real_labels == c)[:count]
    if len(idx) < count:
      raise ValueError(f"only {len(idx)} real examples of class {c}, {count} asked")
    picked.append(idx)
  return np.sort(np.concatenate(picked))
