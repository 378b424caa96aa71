"""CLIP score: 100 × the cosine of an image's and a text's CLIP embeddings, floored
at 0 (CLIPScore, Hessel et al. 2021, as torchmetrics and MLPerf report it). `evaluators.clip_scorer.ClipScorer` embeds
with a finished contrastive run."""
from __future__ import annotations

import numpy as np

from diffusion_jax.contrastive.zero_shot import normalize


def clip_scores(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
  """[N] per-pair scores of row-aligned embeddings."""
  return 100.0 * np.maximum(np.sum(normalize(image_embeddings) * normalize(text_embeddings), axis=-1), 0.0)
