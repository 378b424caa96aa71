"""Evaluators of image-to-text models: they ask about eval-split images and score the generated answers.

`caption_digit`: asks for a caption of each digit; right when the caption names the digit's word and no other digit.
`vqa`: asks one digit question per image (`data.instructions`, held-out phrasings by default); right when the answer
is exactly the expected word; also reported per question kind. `perplexity`: exp of the mean cross-entropy of the
answer tokens of the eval split's conversations. The task must offer `answer(ctx, images, questions, ...)` and,
for perplexity, `token_losses(model, batch)`.
"""
from __future__ import annotations

import re

import numpy as np

from diffusion_jax.config import ConfigError
from diffusion_jax.contrastive.zero_shot import normalize
from diffusion_jax.data import instructions
from diffusion_jax.eval import clip_score
from diffusion_jax.evaluators import clip_scorer
from diffusion_jax.train import evaluators

_WORD = re.compile(r"[a-z]+")


def _needs(task, name: str, config, method: str) -> None:
  if not hasattr(task, method):
    raise ConfigError(f"evals.{name}: a {config.task!r} task does not answer questions about images")


class _Asking(evaluators.Evaluator):
  options = ("max_examples", "heldout", "seed", "key", "max_new_tokens")

  def __init__(self, name, task, config, spec):
    super().__init__(name, task, config, spec)
    _needs(task, name, config, "answer")
    self.max_examples, self.heldout, self.seed = int(spec.max_examples), bool(spec.heldout), int(spec.seed)
    self.max_new_tokens = int(spec.max_new_tokens)

  def images_and_labels(self, ctx):
    got = self.split_outputs(ctx, lambda b: {"image": b["image"], "label": b["label"]},
                             max_examples=self.max_examples)
    return got["image"], got["label"]

  def ask(self, ctx, images, questions):
    return self.task.answer(ctx, images, questions, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens)


def names_digit(answer: str, digit: int) -> bool:
  """The answer says the digit's word (or numeral) and no other digit's."""
  words = set(_WORD.findall(answer.lower())) | set(re.findall(r"\d", answer))
  said = {d for d in range(10) if instructions.WORDS[d] in words or str(d) in words}
  return said == {digit}


@evaluators.register("caption_digit")
class CaptionDigit(_Asking):

  def run(self, ctx):
    images, labels = self.images_and_labels(ctx)
    requests = instructions.CAPTION_REQUESTS_HELDOUT if self.heldout else instructions.CAPTION_REQUESTS
    questions = [requests[i % len(requests)] for i in range(len(labels))]
    answers = self.ask(ctx, images, questions)
    right = np.asarray([names_digit(a, int(l)) for a, l in zip(answers, labels)], np.float32)
    return {self.spec.key or "caption_digit_accuracy": float(right.mean())} if len(right) else {}


@evaluators.register("vqa")
class VQA(_Asking):

  def run(self, ctx):
    images, labels = self.images_and_labels(ctx)
    rng = np.random.default_rng(self.seed)
    asked = [instructions.digit_question(int(l), rng, self.heldout) for l in labels]
    answers = self.ask(ctx, images, [q for _, q, _ in asked])
    right = np.asarray([" ".join(_WORD.findall(a.lower())) == want for a, (_, _, want) in zip(answers, asked)],
                       np.float32)
    if not len(right):
      return {}
    key = self.spec.key or "vqa_accuracy"
    out = {key: float(right.mean())}
    kinds = np.asarray([k for k, _, _ in asked])
    for kind in dict.fromkeys(kinds):
      out[f"{key}_{kind}"] = float(right[kinds == kind].mean())
    return out


@evaluators.register("perplexity")
class Perplexity(evaluators.Evaluator):
  options = ("max_examples", "key")

  def __init__(self, name, task, config, spec):
    super().__init__(name, task, config, spec)
    _needs(task, name, config, "token_losses")
    self.max_examples = int(spec.max_examples)

  def _sums(self, model, batch):
    nll, weight, _ = self.task.token_losses(model, batch)
    return {"nll": (nll * weight).sum(axis=1), "tokens": weight.sum(axis=1)}

  def run(self, ctx):
    got = self.split_outputs(ctx, ctx.jit(self._sums), max_examples=self.max_examples)
    if not got.get("tokens", np.zeros(0)).sum():
      return {}
    return {self.spec.key or "perplexity": float(np.exp(got["nll"].sum() / got["tokens"].sum()))}


def token_f1(prediction: str, reference: str) -> float:
  """SQuAD's token F1: the harmonic mean of word precision and recall (words counted with multiplicity)."""
  pred, ref = _WORD.findall(prediction.lower()), _WORD.findall(reference.lower())
  if not pred or not ref:
    return float(pred == ref)
  common = sum(min(pred.count(w), ref.count(w)) for w in set(pred))
  if not common:
    return 0.0
  p, r = common / len(pred), common / len(ref)
  return 2 * p * r / (p + r)


@evaluators.register("caption_f1")
class CaptionF1(_Asking):
  """Captions of the eval images scored by token F1 against their reference captions (the answers of the eval
  split's caption conversations). With `clip_workdir` (a contrastive run) also: the CLIP score (100 · cosine,
  floored at 0) of the generated captions, and a baseline that captions each image with the training caption its
  CLIP embedding is nearest to, scored the same ways."""
  options = _Asking.options + ("clip_workdir",)

  def __init__(self, name, task, config, spec):
    super().__init__(name, task, config, spec)
    self._clip = None
    if spec.clip_workdir:
      self._clip = clip_scorer.ClipScorer(spec.clip_workdir, f"evals.{name}.clip_workdir", self.batch_size)

  def _references(self, ctx):
    task = self.task
    got = self.split_outputs(ctx, lambda b: {"image": b["image"], "tokens": b["tokens"], "mask": b["loss_mask"]},
                             max_examples=self.max_examples)
    eos = task.tokens.eos_id
    refs = [task.tokenizer.decode([int(t) for t, m in zip(row, mask) if m and t != eos]).strip()
            for row, mask in zip(got["tokens"], got["mask"])]
    return got["image"], refs

  def run(self, ctx):
    images, refs = self._references(ctx)
    if not refs:
      return {}
    requests = instructions.CAPTION_REQUESTS_HELDOUT if self.heldout else instructions.CAPTION_REQUESTS
    answers = self.ask(ctx, images, [requests[i % len(requests)] for i in range(len(refs))])
    key = self.spec.key or "caption_f1"
    out = {key: float(np.mean([token_f1(a, r) for a, r in zip(answers, refs)])),
           f"{key}_exact": float(np.mean([a.strip().lower() == r.lower() for a, r in zip(answers, refs)]))}
    if self._clip is not None:
      out.update(self._with_clip(images, answers, refs, key))
    return out

  def _with_clip(self, images, answers, refs, key):
    from diffusion_jax.data.sources import split_captions
    clip = self._clip
    image_emb = clip.image_embeddings(images)
    data = clip.task.config.data
    train_captions = sorted(set(split_captions(data, data.train_split)))
    train_emb = normalize(clip.text_embeddings(train_captions))
    nearest = [train_captions[i] for i in np.argmax(normalize(image_emb) @ train_emb.T, axis=1)]

    def score(texts):
      return float(np.mean(clip_score.clip_scores(image_emb, clip.text_embeddings(texts))))

    return {f"{key}_clip_score": score(answers), f"{key}_reference_clip_score": score(refs),
            f"{key}_nearest_caption": float(np.mean([token_f1(a, r) for a, r in zip(nearest, refs)])),
            f"{key}_nearest_caption_clip_score": score(nearest)}

