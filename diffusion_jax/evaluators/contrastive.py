"""Contrastive evaluators over the eval split's embeddings (`tasks.contrastive`):

`zero_shot`: classification of the eval images by the class names' prompts (class embeddings averaged over
templates). Options: templates (() = the training caption templates), max_examples. Metrics: zero_shot_top1,
zero_shot_top5, examples.
`retrieval`: image→text and text→image recall@1/5/10 over the distinct captions. Options: max_examples. Metrics:
image_to_text_r{1,5,10}, text_to_image_r{1,5,10}, distinct_captions.
"""
from __future__ import annotations

import numpy as np

from diffusion_jax.contrastive import zero_shot
from diffusion_jax.train import evaluators


class _Embeddings(evaluators.Evaluator):
  options = ("max_examples",)

  def embeddings(self, ctx) -> dict[str, np.ndarray]:
    # Both evaluators read the same embeddings: computed once per evaluation.
    max_examples = int(self.spec.max_examples)
    key = ("contrastive_embeddings", self.split, self.batch_size, max_examples)
    if key not in ctx.memo:
      ctx.memo[key] = self.task.eval_embeddings(ctx, self.split, self.batch_size, max_examples)
    return ctx.memo[key]


@evaluators.register("zero_shot")
class ZeroShot(_Embeddings):
  options = ("max_examples", "templates")

  def run(self, ctx):
    data = self.config.data
    emb = self.embeddings(ctx)
    templates = tuple(self.spec.templates) or tuple(data.caption_templates)
    prompts = zero_shot.class_prompts(data.class_names, templates)
    classes = zero_shot.class_embeddings(self.task.encode_texts(ctx, prompts, self.batch_size), len(data.class_names))
    acc = zero_shot.topk_accuracy(emb["image"], classes, emb["label"])
    return {"examples": float(len(emb["image"])), **{f"zero_shot_{k}": v for k, v in acc.items()}}


@evaluators.register("retrieval")
class Retrieval(_Embeddings):

  def run(self, ctx):
    emb = self.embeddings(ctx)
    unique_tokens, text_ids = zero_shot.dedupe_texts(emb["tokens"])
    # one embedding per distinct caption: the first image's copy (identical tokens give identical embeddings)
    first = np.array([np.flatnonzero(text_ids == i)[0] for i in range(len(unique_tokens))])
    recall = zero_shot.retrieval_recall(emb["image"], emb["text"][first], text_ids)
    return {**recall, "distinct_captions": float(len(unique_tokens))}
