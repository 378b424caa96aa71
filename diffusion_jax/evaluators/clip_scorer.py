"""A finished contrastive run's towers as the CLIP that scores images against texts (`eval.clip_score`), for the
evaluators that report a CLIP score (`digit_accuracy`'s `clip_workdir`, `caption_f1`'s)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from diffusion_jax.contrastive.zero_shot import normalize
from diffusion_jax.eval.clip_score import clip_scores
from diffusion_jax.parallel import host
from diffusion_jax.train import runs
from diffusion_jax.train.trainer import Trainer


def own_clip_workdir(config) -> str:
  """The contrastive run a config already names (a text-to-image run's text tower, a DALL-E run's reranker), if any:
  the default judge of the evaluators that embed images with a CLIP."""
  for section, field in (("text", "clip_workdir"), ("dalle", "clip_workdir")):
    if section in config and config[section].get(field):
      return config[section][field]
  return ""


class ClipScorer:
  """The towers of the contrastive run in `workdir` (its EMA weights where it evaluates with them), restored once.

  Build it while a run sets up its evaluators: a bad path fails before training, and the CLIP run's trainer is set
  up outside that run's mesh context.
  """

  def __init__(self, workdir: str, what: str, batch_size: int = 100):
    run = runs.RunSource(what, workdir, task="contrastive")
    trainer = Trainer(run.config(), workdir)
    self.task, self.ctx = trainer.task, trainer.model_context(trainer.load_for_inference())
    self.batch_size = int(batch_size)
    self._encode_image = self.ctx.jit(lambda model, x: model.encode_image(self.task.pixels(x)))

  def image_embeddings(self, images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] at any size (resized to the run's image size) → [N, D]."""
    import jax
    size = int(self.task.config.data.image_size)
    images = np.asarray(images, np.float32)
    if images.shape[1:3] != (size, size):
      images = np.asarray(jax.image.resize(images, (len(images), size, size, images.shape[-1]), "linear"))
    return host.run_chunked(self._encode_image, images, min(self.batch_size, len(images)))

  def kid_features(self, images: np.ndarray) -> np.ndarray:
    """float64 image embeddings scaled to length √D, so that KID's kernel term x·y/D is their cosine (the `fid`
    evaluator's features='clip')."""
    width = int(self.task.config.model.embed_dim)
    return np.sqrt(width) * normalize(self.image_embeddings(images)).astype(np.float64)

  def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
    return self.task.encode_texts(self.ctx, list(texts), min(self.batch_size, len(texts)))

  def score(self, images: np.ndarray, texts: Sequence[str]) -> float:
    """The mean CLIP score of row-aligned images and texts."""
    return float(np.mean(clip_scores(self.image_embeddings(images), self.text_embeddings(texts))))
