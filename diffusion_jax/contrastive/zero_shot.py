"""Zero-shot classification and image↔text retrieval from embeddings (host-side numpy).

Zero-shot follows the CLIP paper: each class name is written into every prompt template, the normalised text
embeddings are averaged over templates and renormalised, and an image is assigned the class whose embedding is
most similar. Retrieval treats identical captions as one text: an image retrieves its own caption, and a
caption shared by several images (MNIST's "a handwritten digit seven") is found if any of them is.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def class_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
  """class-major list: all templates of class 0, then class 1, ..."""
  return [t.format(name=name) if "{name}" in t else t.format(name) for name in class_names for t in templates]


def class_embeddings(prompt_embeddings: np.ndarray, num_classes: int) -> np.ndarray:
  """[C*T, D] class-major prompt embeddings → [C, D] template-averaged, normalised class embeddings."""
  e = normalize(prompt_embeddings).reshape(num_classes, -1, prompt_embeddings.shape[-1])
  return normalize(e.mean(axis=1))


def topk_accuracy(image_embeddings: np.ndarray, class_embeds: np.ndarray, labels: np.ndarray,
                  ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  scores = normalize(image_embeddings) @ class_embeds.T
  order = np.argsort(-scores, axis=1)
  labels = np.asarray(labels)
  out = {}
  for k in ks:
    if k <= class_embeds.shape[0]:
      out[f"top{k}"] = float(np.mean(np.any(order[:, :k] == labels[:, None], axis=1)))
  return out


def _first_hit_rank(order: np.ndarray, relevant: np.ndarray) -> np.ndarray:
  """For each query row, the rank (0-based) of the first relevant item in `order`."""
  hits = np.take_along_axis(relevant, order, axis=1)
  return np.argmax(hits, axis=1)


def retrieval_recall(image_embeddings: np.ndarray, text_embeddings: np.ndarray, text_ids: np.ndarray,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """Recall@k both ways. `text_ids[i]` is the index in `text_embeddings` of image i's caption.

  Image→text: is image i's caption among its k nearest texts. Text→image: is any image with that caption among
  the caption's k nearest images.
  """
  img, txt = normalize(image_embeddings), normalize(text_embeddings)
  text_ids = np.asarray(text_ids)
  sims = img @ txt.T  # [N_images, N_texts]
  relevant = text_ids[:, None] == np.arange(txt.shape[0])[None, :]
  rank_i2t = _first_hit_rank(np.argsort(-sims, axis=1, kind="stable"), relevant)
  rank_t2i = _first_hit_rank(np.argsort(-sims.T, axis=1, kind="stable"), relevant.T)
  out = {}
  for k in ks:
    out[f"image_to_text_r{k}"] = float(np.mean(rank_i2t < k))
    out[f"text_to_image_r{k}"] = float(np.mean(rank_t2i < k))
  return out


def dedupe_texts(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Unique token rows (one per distinct caption) and, for every row, the index of its unique caption."""
  unique, inverse = np.unique(np.asarray(tokens), axis=0, return_inverse=True)
  return unique, inverse.reshape(-1)
