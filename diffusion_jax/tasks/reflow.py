"""Reflow (Liu et al. 2022, "Flow Straight and Fast"; InstaFlow, Liu et al. 2024): retrain a rectified flow on
(noise, sample) pairs drawn from a trained flow, the teacher, so that its paths straighten and few-step (down to
one-step) Euler sampling works.

With `flow.reflow.teacher_workdir` set to a finished flow run of the same model config, a diffusion-task run
  1. restores the teacher's newest checkpoint (its EMA parameters when `ema.use_for_eval`),
  2. draws `flow.reflow.num_pairs` class-balanced (noise, x_0) pairs with the teacher's classifier-free-guided
     `flow_euler` sampler (`teacher_steps`, `guidance_scale`) and keeps them in WORKDIR/reflow_pairs.npz, so a
     resumed run reads them back instead of sampling again,
  3. starts from the teacher's weights and trains the flow-matching loss with each pair's own noise.
The guidance is baked into the pairs: sample the reflowed model with `sample.guidance_scale=1`.
"""
from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax.config import ConfigError
from diffusion_jax.data import pipeline
from diffusion_jax.tasks.base import ModelContext

PAIRS_FILE = "reflow_pairs.npz"


def options(config) -> dict | None:
  """The reflow settings of `config`, or None when the run is not a reflow."""
  r = (config.get("flow") or {}).get("reflow") or {}
  if not r.get("teacher_workdir"):
    return None
  opts = dict(teacher_workdir=os.path.abspath(r.teacher_workdir), num_pairs=int(r.get("num_pairs", 2048)),
              teacher_steps=int(r.get("teacher_steps", 20)), guidance_scale=float(r.get("guidance_scale", 1.0)),
              seed=int(r.get("seed", 0)))
  if opts["num_pairs"] <= 0 or opts["teacher_steps"] <= 0:
    raise ConfigError(f"flow.reflow.num_pairs and teacher_steps must be positive, got {opts['num_pairs']} and "
                      f"{opts['teacher_steps']}")
  return opts


def load_teacher(config, teacher_workdir: str) -> ModelContext:
  """The teacher's newest checkpoint, built from `config` with the reflow switched off (same model)."""
  from diffusion_jax.train.trainer import Trainer  # the trainer imports the tasks
  if not os.path.isdir(teacher_workdir):
    raise ConfigError(f"flow.reflow.teacher_workdir={teacher_workdir!r} does not exist; train the flow model first")
  teacher_config = ml_collections.ConfigDict(config.to_dict())
  teacher_config.flow.reflow.teacher_workdir = ""
  trainer = Trainer(teacher_config, teacher_workdir)
  try:
    state = trainer.load_for_inference()
  except ValueError as e:  # orbax: the checkpoint's tree does not match this config's model
    raise ConfigError(f"the checkpoint in {teacher_workdir} does not fit this config's model: {e}") from e
  logging.info("reflow teacher: %s at step %d", teacher_workdir, int(state.step))
  return trainer.model_context(state)


def teacher_weights(ctx: ModelContext) -> dict[str, np.ndarray]:
  from diffusion_jax.train.optimizer import param_name
  leaves = jax.tree_util.tree_flatten_with_path(ctx.params)[0]
  return {param_name(path): np.asarray(jax.device_get(leaf)) for path, leaf in leaves}


def _meta(opts: dict, ctx_step: int | None, image_shape) -> dict:
  return dict(teacher_workdir=opts["teacher_workdir"], teacher_step=ctx_step, num_pairs=opts["num_pairs"],
              teacher_steps=opts["teacher_steps"], guidance_scale=opts["guidance_scale"], seed=opts["seed"],
              image_shape=list(image_shape))


def make_pairs(task, ctx: ModelContext, opts: dict) -> dict[str, np.ndarray]:
  """Class-balanced (noise, x_0, label, tokens) rows sampled from the teacher in `ctx`."""
  config = task.config
  num_classes = len(config.data.class_names)
  labels = (np.arange(opts["num_pairs"]) % num_classes).astype(np.int32)
  prompts = pipeline.prompts_for_labels(config.data, labels)
  tokens = task.tokenizer(prompts, config.data.max_text_len)
  chunk = min(int(config.sample.batch_size), opts["num_pairs"])
  fn = ctx.jit_apply(task.reflow_pairs_fn(chunk, opts["guidance_scale"], opts["teacher_steps"]))
  noises, samples = [], []
  t0 = time.time()
  for i, start in enumerate(range(0, opts["num_pairs"], chunk)):
    part, part_labels = tokens[start:start + chunk], labels[start:start + chunk]
    n = len(part)
    if n < chunk:
      part = np.concatenate([part, np.repeat(part[-1:], chunk - n, axis=0)])
      part_labels = np.concatenate([part_labels, np.repeat(part_labels[-1:], chunk - n)])
    noise, x0 = fn(part, part_labels, jax.random.fold_in(jax.random.key(opts["seed"]), i))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      noise, x0 = multihost_utils.process_allgather((noise, x0), tiled=True)
    noises.append(np.asarray(jax.device_get(noise))[:n])
    samples.append(np.asarray(jax.device_get(x0))[:n])
    logging.log_every_n_seconds(logging.INFO, "reflow pairs: %d / %d", 30, start + n, opts["num_pairs"])
  logging.info("sampled %d reflow pairs with %d teacher steps in %.1fs", opts["num_pairs"], opts["teacher_steps"],
               time.time() - t0)
  return dict(noise=np.concatenate(noises), image=np.concatenate(samples), label=labels, tokens=tokens)


def save_pairs(path: str, pairs: dict[str, np.ndarray], meta: dict) -> None:
  tmp = path + ".tmp.npz"
  np.savez(tmp, meta=np.asarray(json.dumps(meta)), **pairs)
  os.replace(tmp, path)  # a run killed while writing leaves no half file behind


def load_pairs(path: str, opts: dict, image_shape) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as f:
    meta = json.loads(str(f["meta"]))
    want = _meta(opts, meta.get("teacher_step"), image_shape)
    if meta != want:
      changed = sorted(k for k in want if meta.get(k) != want[k])
      raise ConfigError(f"{path} holds reflow pairs made with other settings ({', '.join(changed)}); delete it or "
                        "use a new workdir")
    return {k: f[k] for k in ("noise", "image", "label", "tokens")}


def pairs_for_run(task, workdir: str, opts: dict) -> dict[str, np.ndarray]:
  """The run's pairs: read from WORKDIR/reflow_pairs.npz, or sampled from the teacher and written there."""
  d = task.config.data
  image_shape = (d.image_size, d.image_size, d.channels)
  path = os.path.join(workdir, PAIRS_FILE)
  if os.path.exists(path):
    logging.info("reading reflow pairs from %s", path)
    return load_pairs(path, opts, image_shape)
  ctx = task.reflow_teacher()
  pairs = make_pairs(task, ctx, opts)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    save_pairs(path, pairs, _meta(opts, ctx.step, image_shape))
  return pairs
