"""Reflow (Liu et al. 2022, "Flow Straight and Fast"; InstaFlow, Liu et al. 2024): retrain a rectified flow on
(noise, sample) pairs drawn from a trained flow, the teacher, so that its paths straighten and few-step (down to
one-step) Euler sampling works.

`task='reflow'` with `flow.reflow.teacher_workdir` set to a finished flow run of the same model:
  1. the model starts from the teacher's weights (its EMA parameters where it evaluates with them), restored by
     `train.runs` — so before the first step the model *is* the teacher;
  2. it draws `flow.reflow.num_pairs` class-balanced (noise, x_0) pairs from itself with the classifier-free-guided
     `flow_euler` sampler (`teacher_steps`, `guidance_scale`) and keeps them in WORKDIR/reflow_pairs.npz, so a
     resumed run reads them back (the teacher is not needed again);
  3. it trains the flow-matching loss with each pair's own noise.
The guidance is baked into the pairs: sample the reflowed model with `sample.guidance_scale=1`.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffusion_jax.config import ConfigError
from diffusion_jax.data import pipeline
from diffusion_jax.diffusion import flow
from diffusion_jax.parallel import host
from diffusion_jax.tasks.diffusion import DiffusionTask
from diffusion_jax.train import runs, workdir
from diffusion_jax.train.task import ModelContext, register

PAIRS_FILE = "reflow_pairs.npz"
_PAIR_FIELDS = ("noise", "image", "label", "tokens")


def _is_a_flow(teacher_config) -> None:
  if teacher_config.diffusion.objective != "flow":
    raise ConfigError(f"flow.reflow.teacher_workdir trained a {teacher_config.diffusion.objective!r} model, not a "
                      "rectified flow")


@register("reflow")
class ReflowTask(DiffusionTask):
  retrains_a_teacher = True

  def __init__(self, config):
    super().__init__(config)
    r = config.flow.reflow
    if self.objective != "flow":
      raise ConfigError("task='reflow' retrains a rectified flow: set diffusion.objective='flow'")
    if not r.teacher_workdir:
      raise ConfigError("task='reflow' needs flow.reflow.teacher_workdir, a finished flow run to learn from")
    if self.latents is not None:
      raise ConfigError("reflow is not supported with latent diffusion (latent.*)")
    if r.num_pairs <= 0 or r.teacher_steps <= 0:
      raise ConfigError(f"flow.reflow.num_pairs and teacher_steps must be positive, got {r.num_pairs} and "
                        f"{r.teacher_steps}")
    self.teacher = runs.RunSource("flow.reflow.teacher_workdir", r.teacher_workdir,
                                  task=("diffusion", "text_to_image_diffusion", "reflow"), check=_is_a_flow)
    self.pairs = None

  def weight_sources(self):
    return [*super().weight_sources(), self.teacher]

  def prepare(self, ctx: ModelContext, *, training: bool) -> None:
    super().prepare(ctx, training=training)
    if training:
      self.pairs = self._pairs_for_run(ctx)

  def check_run(self) -> None:
    """Nothing to open: the model trains on pairs it samples itself."""

  def train_dataset(self, ctx: ModelContext, *, global_batch_size: int, seed: int):
    rows = dict(self.pairs, valid=np.ones(len(self.pairs["label"]), np.float32))
    return pipeline.make_array_dataset(rows, global_batch_size=global_batch_size, seed=seed,
                                       process_index=jax.process_index(), process_count=jax.process_count())

  # ------------------------------------------------------------------ the pairs
  def _meta(self) -> dict:
    r = self.config.flow.reflow
    return dict(teacher=self.teacher.path, num_pairs=int(r.num_pairs),
                teacher_steps=int(r.teacher_steps), guidance_scale=float(r.guidance_scale), seed=int(r.seed),
                image_shape=list(self.shape))

  def _pairs_for_run(self, ctx: ModelContext) -> dict[str, np.ndarray]:
    """Read from WORKDIR/reflow_pairs.npz, or sampled from the model (the teacher at step 0) and written there."""
    pairs = workdir.sampled_once(os.path.join(ctx.workdir, PAIRS_FILE), self._meta(), lambda: self.make_pairs(ctx),
                                 step=ctx.step, is_main=ctx.is_main_process, what="reflow pairs")
    return {k: pairs[k] for k in _PAIR_FIELDS}

  def make_pairs(self, ctx: ModelContext) -> dict[str, np.ndarray]:
    """Class-balanced (noise, x_0, label, tokens) rows sampled from the model in `ctx`."""
    r, d = self.config.flow.reflow, self.config.data
    labels = (np.arange(r.num_pairs) % len(d.class_names)).astype(np.int32)
    inputs = self.prompt_inputs(pipeline.prompts_for_labels(d, labels), labels)
    chunk = min(int(self.config.sample.batch_size), int(r.num_pairs))
    fn = ctx.jit(self._pairs_fn(chunk), key=(self, "reflow_pairs", chunk))
    uninputs = self.prompt_inputs([""])
    t0 = time.time()
    noise, x0 = host.run_chunked(lambda part, rng: fn(part, uninputs, rng), inputs, chunk,
                                 extra=lambda i: (jax.random.fold_in(jax.random.key(int(r.seed)), i),))
    logging.info("sampled %d reflow pairs with %d teacher steps in %.1fs", r.num_pairs, r.teacher_steps,
                 time.time() - t0)
    return dict(noise=noise, image=x0, label=labels, tokens=inputs["tokens"])

  def _pairs_fn(self, num_images: int):
    """`(model, inputs, uninputs, rng) -> (noise, x_0)`: the guided flow's samples and the noise they came from."""
    r, s = self.config.flow.reflow, self.config.sample
    shape = (num_images, *self.shape)

    def pairs(model, inputs, uninputs, rng):
      model_fn = self.guided_model_fn(model, inputs, uninputs, float(r.guidance_scale))
      noise, x0 = flow.reflow_pairs(model_fn, jax.random.normal(rng, shape, jnp.float32), num_steps=int(r.teacher_steps),
                                    shift=float(s.shift), num_train_timesteps=self.config.diffusion.num_timesteps)
      return noise, (jnp.clip(x0, -1.0, 1.0) if s.clip_x0 else x0)

    return pairs
