"""Evaluators by name, configured by `config.evals` (as big_vision does).

  c.evals.loss = evaluator('loss', batch_size=256, batches=4)        # diffusion_jax.defaults.evaluator
  c.evals.digits = evaluator('digit_accuracy', per_class=50, every=-1)

Each entry names an evaluator type (a class registered by `register`; the built-in ones live in
`diffusion_jax.evaluators`) and its options. `every`: 0 runs it every `train.eval_every` steps (if set), at the end
of training (`train.eval_at_end`) and in `--mode eval`; N > 0 every N steps as well as then; -1 never. `split` ''
is `data.eval_split`. Metrics are logged as `eval/<key>`; two evaluators giving the same key is an error.

Evaluators are built once per trainer and keep their jitted functions (`ModelContext.jit`), so a periodic
evaluation does not recompile. The eval-split loop (padded last batch, valid rows only, gathered from every
process) is `split_outputs`, written once here.
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Mapping

import jax
import numpy as np

from diffusion_jax.config import ConfigError
from diffusion_jax.data import pipeline
from diffusion_jax.parallel import host
from diffusion_jax.registry import Registry
from diffusion_jax.train.task import ModelContext, Task

EVALUATORS = Registry("evaluator", ("diffusion_jax.evaluators.loss", "diffusion_jax.evaluators.digits",
                                    "diffusion_jax.evaluators.contrastive", "diffusion_jax.evaluators.reconstruction",
                                    "diffusion_jax.evaluators.captioning",
                                    "diffusion_jax.evaluators.unclip", "diffusion_jax.evaluators.upsampler",
                                    "diffusion_jax.evaluators.likelihood", "diffusion_jax.evaluators.noisy_classifier",
                                    "diffusion_jax.evaluators.fid", "diffusion_jax.evaluators.text_to_image_retrieval",
                                    "diffusion_jax.evaluators.classification", "diffusion_jax.evaluators.concept"))
register = EVALUATORS.register
COMMON_OPTIONS = ("type", "every", "split", "batch_size")


class Evaluator(abc.ABC):
  """One `config.evals` entry: `run(ctx)` returns {key: value}, logged as `eval/<key>`."""

  # Options the evaluator reads besides COMMON_OPTIONS; any other option in its config entry is an error.
  options: tuple[str, ...] = ()

  def __init__(self, name: str, task: Task, config, spec):
    self.name, self.task, self.config, self.spec = name, task, config, spec
    unknown = sorted(set(spec.keys()) - set(COMMON_OPTIONS) - set(self.options))
    if unknown:
      raise ConfigError(f"evals.{name} ({spec.type}) has no option {unknown[0]!r}; it takes "
                        f"{', '.join(COMMON_OPTIONS[1:] + self.options)}")
    missing = [k for k in COMMON_OPTIONS + self.options if k not in spec]
    if missing:
      raise ConfigError(f"evals.{name} ({spec.type}) lacks option {missing[0]!r}: write its entry with "
                        f"diffusion_jax.defaults.evaluator({spec.type!r}, ...) and give every option of the type")
    self.every = int(spec.every)
    self.split = spec.split or config.data.eval_split
    self.batch_size = int(spec.batch_size or config.train.batch_size)

  @abc.abstractmethod
  def run(self, ctx: ModelContext) -> dict[str, float]:
    """Metrics of the model in `ctx`."""

  def due(self, step: int, eval_every: int, at_end: bool) -> bool:
    if self.every < 0:
      return False
    if at_end:
      return True
    period = self.every or eval_every
    return bool(period) and step % period == 0

  def split_outputs(self, ctx: ModelContext, fn: Callable[[dict], Mapping[str, Any]], *, max_examples: int = 0,
                    max_batches: int = 0) -> dict[str, np.ndarray]:
    """`split_outputs` over this evaluator's split and batch size."""
    return split_outputs(ctx, self.config.data, self.split, self.batch_size, fn, max_examples=max_examples,
                         max_batches=max_batches, examples=self.task.data_examples)

  def images_and_captions(self, ctx: ModelContext, max_examples: int = 0) -> tuple[np.ndarray, list[str]]:
    """`images_and_captions` of this evaluator's split and batch size."""
    return images_and_captions(ctx, self.config.data, self.split, self.batch_size, max_examples,
                               examples=self.task.data_examples, what=f"evals.{self.name}")


def images_and_captions(ctx: ModelContext, data_cfg, split: str, batch_size: int, max_examples: int = 0, *,
                        examples=None, what: str = "data") -> tuple[np.ndarray, list[str]]:
  """A split's images and their captions, in order (a source without captions, MNIST, is captioned from its class
  names as its training captions are)."""
  from diffusion_jax.data.sources import split_captions
  got = split_outputs(ctx, data_cfg, split, batch_size, lambda batch: {"image": batch["image"], "label": batch["label"]},
                      max_examples=max_examples, examples=examples)
  captions = split_captions(data_cfg, split)[:len(got["image"])]
  if not captions and data_cfg.class_names:
    captions = pipeline.prompts_for_labels(data_cfg, got["label"])
  if len(captions) != len(got["image"]):
    raise ConfigError(f"{what}: {len(got['image'])} {split} images but {len(captions)} captions")
  return got["image"], captions


def split_outputs(ctx: ModelContext, data_cfg, split: str, batch_size: int, fn: Callable[[dict], Mapping[str, Any]],
                  *, max_examples: int = 0, max_batches: int = 0, examples=None) -> dict[str, np.ndarray]:
  """`fn(global_batch) -> {name: [B, ...]}` over a data split in order, gathered to every process, with the rows of
  the padded last batch dropped; at most `max_examples` rows or `max_batches` batches (0: all). `examples` is the
  task's `data_examples` stage (see `pipeline.make_dataset`)."""
  ds = pipeline.make_dataset(data_cfg, split, global_batch_size=batch_size, seed=0,
                             process_index=jax.process_index(), process_count=jax.process_count(),
                             shuffle=False, repeat=False, drop_remainder=False, examples=examples)
  out: dict[str, list] = {}
  seen = 0
  it = iter(ds)
  try:
    for i, batch in enumerate(it):
      if max_batches and i >= max_batches:
        break
      batch = ctx.global_batch(batch)
      got = host.gather(dict(fn(batch), valid=batch["valid"]))
      keep = got.pop("valid") > 0
      for key, value in got.items():
        out.setdefault(key, []).append(value[keep])
      seen += int(keep.sum())
      if max_examples and seen >= max_examples:
        break
  finally:
    close = getattr(it, "close", None)
    if callable(close):
      close()
  return {k: np.concatenate(v)[: max_examples or None] for k, v in out.items()}


def make_evaluators(task: Task, config) -> dict[str, Evaluator]:
  """The evaluators of `config.evals`, in the order the config lists them."""
  return {name: EVALUATORS.get(spec.type, f"evals.{name}.type")(name, task, config, spec)
          for name, spec in config.evals.items()}


def run_all(evaluators: Mapping[str, Evaluator], ctx: ModelContext) -> dict[str, float]:
  """Every given evaluator's metrics as `eval/<key>`; two evaluators giving one key is a ConfigError."""
  metrics: dict[str, float] = {}
  owner: dict[str, str] = {}
  for name, evaluator in evaluators.items():
    for key, value in evaluator.run(ctx).items():
      key = f"eval/{key}"
      if key in owner:
        raise ConfigError(f"evals.{name} and evals.{owner[key]} both report {key}; give one of them another key")
      owner[key], metrics[key] = name, float(value)
  return metrics
