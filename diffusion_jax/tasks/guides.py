"""Gradient guides of a diffusion run's sampler (`diffusion.gradient_guidance`), set under `sample.*`:

  sample.classifier_guidance.workdir/.scale   a finished `noisy_classifier` run (`tasks.noisy_classifier`) with the
                                              same noise schedule steers each sample to its class label
  sample.clip_guidance.workdir/.scale/.cutouts/.through_model  a finished contrastive run's towers steer the
                                              predicted x_0 towards its prompt's CLIP text embedding (through_model:
                                              differentiate x_0 through the denoiser too)

Their weights are restored frozen under the model's `guide.<name>` at any start (sampling alone uses them, so they
may be added, swapped or dropped later), and their scores summed in one gradient per step.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.config import ConfigError
from diffusion_jax.diffusion import gradient_guidance
from diffusion_jax.tasks import clip_towers
from diffusion_jax.train import runs


class ClassifierGuide:
  name = "classifier"
  through_model = False  # its score reads x_t itself

  def __init__(self, config, schedule):
    g = config.sample.classifier_guidance
    self.scale = float(g.scale)
    what = "sample.classifier_guidance.workdir"
    self.source = runs.RunSource(what, g.workdir, task="noisy_classifier", target=f"guide.{self.name}", frozen=True,
                                 recorded=False)
    self.task = self.source.task()
    theirs = np.asarray(self.task.schedule.alphas_cumprod)
    if theirs.shape != np.shape(schedule.alphas_cumprod) or not np.allclose(theirs, schedule.alphas_cumprod,
                                                                            rtol=1e-5, atol=1e-7):
      raise ConfigError(f"{what}={g.workdir!r} was trained on another noise schedule than this run's diffusion.* "
                        "(schedule, num_timesteps, beta_start, beta_end must match)")

  def build(self, rngs: nnx.Rngs) -> nnx.Module:
    return self.task.build_model(rngs)

  def inputs(self, prompts: Sequence[str], labels: np.ndarray) -> dict:
    return {}

  def score(self, module, inputs: dict, rng) -> gradient_guidance.ScoreFn:
    return gradient_guidance.classifier_score(module, inputs["label"])


class ClipGuide:
  name = "clip"

  def __init__(self, config):
    g = config.sample.clip_guidance
    self.scale, self.cutouts, self.through_model = float(g.scale), int(g.cutouts), bool(g.through_model)
    self.clip = clip_towers.FrozenClip("sample.clip_guidance.workdir", g.workdir, target=f"guide.{self.name}",
                                       purpose="CLIP guidance")
    self.source = self.clip.source

  def build(self, rngs: nnx.Rngs) -> nnx.Module:
    return self.clip.build(rngs)

  def inputs(self, prompts: Sequence[str], labels: np.ndarray) -> dict:
    return {"clip_tokens": self.clip.tokens(prompts)}

  def score(self, module, inputs: dict, rng) -> gradient_guidance.ScoreFn:
    text = module.encode_text(inputs["clip_tokens"]).astype(jnp.float32)
    return gradient_guidance.clip_score(lambda images: self.clip.embed_images(module, images), text,
                                        cutouts=self.cutouts, rng=rng)


def from_config(config, schedule, sampler: str) -> list:
  """The guides `sample.*` asks for (a scale of 0 with a workdir still loads it, so `--config` can sweep scales)."""
  s = config.sample
  guides = []
  if s.classifier_guidance.workdir:
    guides.append(ClassifierGuide(config, schedule))
  elif s.classifier_guidance.scale:
    raise ConfigError("sample.classifier_guidance.scale is set but .workdir is empty: give a finished "
                      "noisy_classifier run (e.g. configs/mnist_noisy_classifier.py)")
  if s.clip_guidance.workdir:
    guides.append(ClipGuide(config))
  elif s.clip_guidance.scale:
    raise ConfigError("sample.clip_guidance.scale is set but .workdir is empty: give a finished contrastive run "
                      "(e.g. configs/mnist_clip.py)")
  if guides:
    try:
      gradient_guidance.check_sampler(sampler)
    except ValueError as e:
      raise ConfigError(f"sample.sampler: {e}") from None
  return guides


def guided(model_fn, guides: Sequence, modules, inputs: dict, rng, schedule, prediction_type: str):
  """`model_fn` shifted by every guide's scaled score gradient (one backward pass for all of them)."""
  if not guides:
    return model_fn
  rngs = jax.random.split(rng, len(guides))
  scores = [(g.scale, g.score(modules[g.name], inputs, r)) for g, r in zip(guides, rngs)]

  def total(x, t, x0_hat):
    return sum(scale * fn(x, t, x0_hat) for scale, fn in scores)

  return gradient_guidance.gradient_guidance(model_fn, schedule, total, 1.0, prediction_type,
                                            through_model=any(g.through_model for g in guides))
