"""Text-to-image sampling from a pretrained diffusers Stable Diffusion folder, for `main.py --pretrained`.

  python -m diffusion_jax.main --mode sample --pretrained path/to/stable-diffusion-v1-5 --workdir /tmp/sd \
      --config.sample.prompts='("a photo of a cat", "a lighthouse at dusk, watercolour")' --config.sample.per_prompt=2

Writes PNGs, `index.jsonl` (prompt, seed and settings per image) and `grid.png` under WORKDIR/samples/pretrained/
(WORKDIR/samples/pretrained_2/ and so on for later invocations: none overwrites another's).
This module is also the default `--config` of such a run (its `get_config`); `configs/sd_sample.py` is the same.

Image i starts from its own initial noise, drawn from seed `sample.seed + i`, so an image does not change with
`sample.batch_size` or with the prompts around it (ancestral samplers' per-step noise comes from the batch's first
seed and does depend on the batch). The last batch is padded to `batch_size` so every batch runs one compiled program.
"""
from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from diffusion_jax.config import ConfigError, check_values, compute_dtype
from diffusion_jax.parallel import host
from diffusion_jax.train import runtime, workdir as workdir_lib

TASK = "pretrained_sampling"  # marks a config that only makes sense with --pretrained


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg:
    raise ValueError(f"unknown config argument {arg!r}; this config takes none")
  c = ml_collections.ConfigDict()
  c.task = TASK
  c.sample = ml_collections.ConfigDict(dict(
      prompts=("a photograph of an astronaut riding a horse",),
      negative_prompt="",  # one for every prompt; '' is diffusers' default unconditional prompt
      per_prompt=1,  # images per prompt
      num_steps=25,
      guidance_scale=7.5,  # <= 1 turns classifier-free guidance off (one U-Net pass per step)
      seed=0,
      height=0, width=0,  # 0: the pipeline's native size (U-Net sample_size × VAE factor)
      sampler="",  # '': the folder's scheduler; ours ('ddim', 'dpmpp_2m', 'euler', ...) or a diffusers class name
      batch_size=4,  # images per compiled call
  ))
  c.model = ml_collections.ConfigDict(dict(compute_dtype="float32", attention_impl="", allow_pickle=False))
  return c


def _check(s) -> None:
  prompts = s.prompts
  if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
    raise ConfigError(f"sample.prompts must be a non-empty tuple of strings, e.g. "
                      f"--config.sample.prompts='(\"a cat\",)'; got {prompts!r}")


def load(config, folder: str):
  """The pipeline of `folder` with the config's sampler and model settings; bad folders are ConfigErrors."""
  from diffusion_jax import pretrained
  m = config.get("model") or ml_collections.ConfigDict(dict(compute_dtype="float32", attention_impl="",
                                                             allow_pickle=False))
  try:
    return pretrained.load_pipeline(folder, sampler=config.sample.sampler or None, dtype=compute_dtype(m.compute_dtype),
                                    attention_impl=m.attention_impl or None, allow_pickle=bool(m.allow_pickle))
  except ValueError as e:  # WeightsError included: missing folder, not a pipeline, missing component, scheduler
    raise ConfigError(f"--pretrained {folder}: {e}") from None


def run(config, folder: str, workdir: str) -> dict[str, Any]:
  """Generates every prompt × per_prompt image and writes them under workdir/samples/pretrained/."""
  import jax
  from diffusion_jax.eval import image_io
  if "sample" not in config or "prompts" not in config.sample:
    raise ConfigError("--pretrained needs a config with a `sample` section, e.g. --config configs/sd_sample.py "
                      "(the default when --config is not given)")
  s = config.sample
  _check(s)
  check_values(config)
  workdir_lib.prepare(workdir, need_checkpoint=False)  # a workdir that is a file fails now, not after sampling
  runtime.use_compilation_cache()  # as a trained run's start does
  pipe = load(config, folder)
  height, width = int(s.height) or pipe.default_size, int(s.width) or pipe.default_size
  f = pipe.vae_scale_factor
  if height % f or width % f:
    raise ConfigError(f"sample.height and sample.width must be multiples of {f} (the VAE's downsampling); "
                      f"got {height}x{width}")
  prompts = [p for p in s.prompts for _ in range(int(s.per_prompt))]
  seeds = [int(s.seed) + i for i in range(len(prompts))]
  shape = (height // f, width // f, pipe.vae.config.latent_channels)
  noise = np.stack([np.random.default_rng(seed).standard_normal(shape).astype(np.float32) for seed in seeds])
  negative = s.negative_prompt or None

  def generate(part):
    out = pipe(list(part["prompt"]), num_inference_steps=int(s.num_steps), guidance_scale=float(s.guidance_scale),
               seed=int(part["seed"][0]), height=height, width=width, latents=part["latents"],
               negative_prompt=negative)
    logging.info("generated a batch of %d images", len(out))
    return out

  # Same shapes for every batch (the last one padded): one compile.
  images = host.run_chunked(generate, {"prompt": np.asarray(prompts, object), "seed": np.asarray(seeds),
                                       "latents": noise}, int(s.batch_size))
  if jax.process_index() != 0:
    return {}
  out_dir = image_io.new_sample_dir(os.path.join(workdir, "samples"), "pretrained")
  settings = dict(negative_prompt=s.negative_prompt, num_steps=int(s.num_steps), guidance_scale=float(s.guidance_scale),
                  sampler=pipe.sampler.name, height=height, width=width, pretrained=os.path.abspath(folder))
  # One row per prompt when there are several images of each.
  cols = int(s.per_prompt) if int(s.per_prompt) > 1 else None
  written = image_io.save_samples(out_dir, images, prompts, grid_cols=cols,
                                  extra=[dict(seed=seed, **settings) for seed in seeds])
  logging.info("wrote %d images to %s", len(prompts), out_dir)
  return written
