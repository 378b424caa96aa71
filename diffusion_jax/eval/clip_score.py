"""CLIP score: 100 × the cosine of an image's and a text's CLIP embeddings, floored
at 0 (CLIPScore, Hessel et al. 2021, as torchmetrics and MLPerf report it). `evaluators.clip_scorer.ClipScorer` embeds
with a finished contrastive run."""
from __future__ import annotations

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def clip_scores(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
  """[N] per-pair scores of row-aligned embeddings."""
  return 100.0 * np.maximum(np.sum(unit(image_embeddings) * unit(text_embeddings), axis=-1), 0.0)
