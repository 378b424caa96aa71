"""The latent space of latent diffusion: a frozen VAE (another run of ours or a diffusers folder), the latents'
scale, and the latent cache (`data.latent_cache`).

`config.latent` (both VAE sources empty: pixel diffusion):
  vae_workdir       a finished autoencoder run (e.g. configs/mnist_vae.py): its parameters (EMA where it evaluates
                    with them), restored by `train.runs` onto this run's mesh as the frozen `vae` of the model.
  vae_pretrained    or a diffusers `vae/` folder; give its scaling factor with it (0.18215 for SD 1.x).
  scaling_factor    > 0: latents are multiplied by it. 0: 1 / std of the training latents, estimated once (over the
                    whole cache, else the first `scale_examples` training images) and recorded in
                    WORKDIR/latent_scale.json, the way SD's 0.18215 was chosen; later runs in the workdir read it,
                    and so do LoRA runs on that run (`lora.base_workdir`).
  cache, cache_dir  encode the whole training split once into ArrayRecord shards (default WORKDIR/latent_cache)
                    and train from them: no encoder in the training loop. `cache_batch_size` images per encoder
                    call, `shard_size` examples per shard.

A latent is the VAE posterior's mean (minus the VAE's shift factor) times the scale, never a sample: deterministic,
so the cache holds exactly what encoding inside the step gives. Without the cache the step encodes each batch with
the frozen VAE (sharded like the rest of the model); samples are decoded inside the sampling program.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging

from diffusion_jax.config import ConfigError
from diffusion_jax.data import latent_cache, pipeline
from diffusion_jax.models.vae import AutoencoderKL, VAEConfig
from diffusion_jax.parallel import host
from diffusion_jax.train import runs
from diffusion_jax.train.task import ModelContext

SCALE_FILE = "latent_scale.json"
CACHE_FORMAT = 2


def identity(source: runs.Source) -> dict:
  """What a cache or a scale record keeps of a source: path, step and content fingerprint."""
  d = source.describe()
  return {"path": d["path"], "step": d["step"], "fingerprint": d["fingerprint"]}


class LatentSpace:
  """The frozen VAE's source and architecture, the latents' scale, and the cache of one latent-diffusion run."""

  def __init__(self, config):
    s = config.latent
    if s.vae_workdir and s.vae_pretrained:
      raise ConfigError("set one of latent.vae_workdir and latent.vae_pretrained, not both")
    if s.scaling_factor < 0 or min(s.cache_batch_size, s.shard_size, s.scale_examples) <= 0:
      raise ConfigError("latent.scaling_factor must be >= 0 and latent.cache_batch_size, shard_size and "
                        "scale_examples positive")
    self.config, self.options = config, s
    if s.vae_workdir:
      self.source = runs.RunSource("latent.vae_workdir", s.vae_workdir, task="autoencoder", select=("vae",),
                                   frozen=True)
      self.vae_config: VAEConfig = self.source.task().vae_config
    else:
      from diffusion_jax import pretrained
      from diffusion_jax.pretrained import vae as pretrained_vae, weights
      if not os.path.isdir(s.vae_pretrained):
        raise ConfigError(f"latent.vae_pretrained={s.vae_pretrained!r} is not a folder")
      try:
        self.vae_config = pretrained_vae.config_from_diffusers(weights.read_config(s.vae_pretrained))
      except weights.WeightsError as e:
        raise ConfigError(f"latent.vae_pretrained: {e}") from None
      self.source = runs.ModuleSource("latent.vae_pretrained", s.vae_pretrained, pretrained.load, target="vae",
                                      frozen=True, expect=AutoencoderKL)
    d, v = config.data, self.vae_config
    if v.in_channels != d.channels:
      raise ConfigError(f"the VAE takes {v.in_channels} channels but data.channels={d.channels}")
    if d.image_size % v.downsample_factor:
      raise ConfigError(f"data.image_size={d.image_size} is not a multiple of the VAE's downsampling factor "
                        f"{v.downsample_factor}")
    size = d.image_size // v.downsample_factor
    self.shape = (size, size, v.latent_channels)  # what the denoiser sees
    self.shift = float(v.shift_factor or 0.0)
    self.scale = float(s.scaling_factor) or None  # known once `prepare` ran
    self.images_encoded = 0  # images this process ran through the encoder (tests check a cache hit)
    self.meta = None  # the cache's meta.json, once written or read

  @staticmethod
  def wanted(config) -> bool:
    return bool(config.latent.vae_workdir or config.latent.vae_pretrained)

  # ------------------------------------------------------------------ encoding outside the step
  def encoder(self, ctx: ModelContext, text: bool):
    """`encode(batch) -> {'latent': unscaled posterior means, and with `text` the frozen tower's states}`."""

    def encode(model, batch):
      out = {"latent": model.vae.encode(batch["image"]).mean}
      if text:
        out.update(model.conditioners["clip_text"]({"tokens": batch["tokens"]}))
      return out

    jitted = ctx.jit(encode, key=(self, "latent_encode", text))

    def call(batch):
      self.images_encoded += len(batch["image"])
      return host.gather(jitted({k: np.asarray(batch[k]) for k in ("image", "tokens")}))

    return call

  # ------------------------------------------------------------------ the scale
  def prepare(self, ctx: ModelContext, *, training: bool, text_tower: dict | None, seed: int) -> None:
    """Writes or reads the cache (training only) and fixes the scale: the config's, the workdir's record, or (in
    training) the std of the training latents. `text_tower` describes a frozen text tower whose states the cache
    also holds (None: no tower)."""
    s = self.options
    if training and s.cache:
      settings = self.cache_settings(text_tower)
      self.meta = latent_cache.ensure_cache(
          self.cache_dir(ctx.workdir), settings, self.config.data, encode=self.encoder(ctx, text_tower is not None),
          batch_size=s.cache_batch_size, shard_size=s.shard_size, seed=seed, shift=self.shift)
    if self.scale is not None:
      return
    path = os.path.join(ctx.workdir, SCALE_FILE)
    identity = self.identity()
    base_run = self.config.lora.base_workdir if "lora" in self.config else ""
    if base_run and not os.path.exists(path) and os.path.exists(os.path.join(base_run, SCALE_FILE)):
      path = os.path.join(base_run, SCALE_FILE)  # adapters on a finished run see its latents with its scale
    if os.path.exists(path):
      with open(path) as f:
        record = json.load(f)
      if record["vae"] != identity:
        raise ConfigError(f"{path} holds the scale of another VAE ({record['vae']}); use a new workdir or set "
                          "latent.scaling_factor")
    elif not training:
      raise ConfigError(f"latent.scaling_factor=0 and {path} does not exist: the first training run estimates "
                        "the scale there (or set latent.scaling_factor)")
    else:
      std, count = ((self.meta["latent_std"], self.meta["latent_values"]) if self.meta is not None
                    else self._estimate(ctx, seed))
      record = {"scaling_factor": 1.0 / std, "latent_std": std, "values": count, "vae": identity}
      logging.info("latent scale 1/std = %.5f, from %d latent values", record["scaling_factor"], count)
      if jax.process_index() == 0:
        latent_cache.write_json(path, record)
    self.scale = float(record["scaling_factor"])

  def identity(self) -> dict:
    return identity(self.source)

  def _estimate(self, ctx: ModelContext, seed: int) -> tuple[float, int]:
    """The std of the first `scale_examples` training images' latents (every process computes the same)."""
    d, s = self.config.data, self.options
    batch_size = min(s.cache_batch_size, s.scale_examples)
    ds = pipeline.make_dataset(d, d.train_split, global_batch_size=batch_size, seed=seed, shuffle=False,
                               repeat=False, drop_remainder=False)
    encode = self.encoder(ctx, text=False)
    moments, seen = latent_cache.Moments(), 0
    for batch in ds:
      valid = batch["valid"] > 0
      moments.add(encode(batch)["latent"][valid] - self.shift)
      seen += int(valid.sum())
      if seen >= s.scale_examples:
        break
    if not moments.count:
      raise ConfigError("no valid training image to estimate latent.scaling_factor from")
    return moments.std(), moments.count

  # ------------------------------------------------------------------ the cache
  def cache_dir(self, workdir: str) -> str:
    return self.options.cache_dir or os.path.join(workdir, "latent_cache")

  def cache_settings(self, text_tower: dict | None) -> dict:
    return {"format": CACHE_FORMAT, "latent": "posterior mean, unscaled", "latent_shape": list(self.shape),
            "vae": self.identity(), "text_tower": text_tower,
            "data": latent_cache.data_settings(self.config.data)}

  def cached_dataset(self, *, global_batch_size: int, seed: int, workdir: str):
    """Training rows from the cache, the scaled latent in 'latents'."""
    source = latent_cache.CacheSource(latent_cache.shard_paths(self.cache_dir(workdir), self.meta), self.scale,
                                      self.shift)
    return pipeline.make_rows_dataset(source, global_batch_size=global_batch_size, seed=seed,
                                      process_index=jax.process_index(), process_count=jax.process_count())
