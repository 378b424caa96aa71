"""`text_retrieval`: how well a text-to-image model's images carry their captions, judged by a CLIP run: one image is
generated for each caption of the eval split (held-out emoji names, for instance), and each image's own caption is
ranked among all of those captions by CLIP similarity (a source without captions is captioned from its class names,
whose repeats then tie and count against the image). The same ranking of the real eval images is reported beside
it: the judge's own ceiling.

Options: clip_workdir (a finished contrastive run: the judge; '' = the one the config names, `dalle.clip_workdir`), max_examples
(0 = the whole split), seed, candidates (> 0: images a reranking task draws per caption; 1: none; 0: its default),
key ('' = 'text_retrieval'). Metrics `<key>_r1`, `_r5`, `_r10` (the share of images whose caption ranks in the top
k; chance k/N), `<key>_clip_score`, `<key>_real_r1`, `_real_r5`, `_real_r10`, `<key>_examples`. A judge that is also
the task's reranker favours the reranked images: name another run to avoid it.
"""
from __future__ import annotations

import numpy as np

from diffusion_jax.config import ConfigError
from diffusion_jax.contrastive.zero_shot import normalize
from diffusion_jax.eval.clip_score import clip_scores
from diffusion_jax.evaluators.clip_scorer import ClipScorer, own_clip_workdir
from diffusion_jax.train import evaluators


def recall_at(similarity: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
  """The share of rows whose diagonal entry ranks in the top k of the row, per k (ties count against it)."""
  own = np.diag(similarity)[:, None]
  rank = np.sum(similarity > own, axis=1) + np.sum((similarity == own), axis=1) - 1  # 0 = the best
  return {f"r{k}": float(np.mean(rank < k)) for k in ks}


@evaluators.register("text_retrieval")
class TextRetrieval(evaluators.Evaluator):
  options = ("clip_workdir", "max_examples", "seed", "candidates", "key")

  def __init__(self, name, task, config, spec):
    super().__init__(name, task, config, spec)
    if not hasattr(task, "generate"):
      raise ConfigError(f"evals.{name}: a {config.task!r} task does not generate images")
    if spec.candidates and not hasattr(task, "reranks"):
      raise ConfigError(f"evals.{name}.candidates: a {config.task!r} task does not rerank its samples")
    workdir = spec.clip_workdir or own_clip_workdir(config)
    if not workdir:
      raise ConfigError(f"evals.{name}.clip_workdir is empty: give a finished contrastive run to judge with")
    self.clip = ClipScorer(workdir, f"evals.{name}.clip_workdir", self.batch_size)
    self.key = spec.key or "text_retrieval"
    self.options = {"candidates": int(spec.candidates)} if spec.candidates else {}

  def run(self, ctx):
    real, captions = self.images_and_captions(ctx, int(self.spec.max_examples))
    text = normalize(self.clip.text_embeddings(captions))
    images = self.task.generate(ctx, captions, int(self.spec.seed), **self.options)
    generated = normalize(self.clip.image_embeddings(images))
    out = {f"{self.key}_{k}": v for k, v in recall_at(generated @ text.T).items()}
    out |= {f"{self.key}_real_{k}": v for k, v in recall_at(normalize(self.clip.image_embeddings(real)) @ text.T).items()}
    out[f"{self.key}_clip_score"] = float(np.mean(clip_scores(generated, text)))
    out[f"{self.key}_examples"] = float(len(captions))
    return out
