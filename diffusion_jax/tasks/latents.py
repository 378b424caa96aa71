"""Latent diffusion's data side: images become frozen-VAE latents before the denoiser sees them, optionally once.

`config.latent` (both VAE sources empty, or no section: pixel diffusion):
  vae_workdir       a finished autoencoder run of ours (e.g. configs/mnist_vae.py), restored read-only with the
                    config it saved (`diffusion_jax.tasks.frozen`): its newest checkpoint's EMA or plain parameters.
  vae_pretrained    or a diffusers `vae/` folder (`diffusion_jax.pretrained`); give its scaling factor with it
                    (0.18215 for SD 1.x) to match the models trained on it.
  scaling_factor    > 0: latents are multiplied by it. 0: 1 / std of the training latents, estimated once (over the
                    whole cache, else the first `scale_examples` training images) and recorded in
                    WORKDIR/latent_scale.json, the way SD's 0.18215 was chosen; later runs in the workdir read it.
  cache, cache_dir  encode the whole training split once into ArrayRecord shards (default WORKDIR/latent_cache) and
                    train from them: no encoder in the training loop (the published stacks report ~1.4x throughput).
                    `cache_batch_size` images per encoder call, `shard_size` examples per shard.

A latent is the VAE posterior's *mean* (minus the VAE's shift factor, if any) times the scale, never a sample: it is
deterministic, so the cache holds exactly what on-the-fly encoding gives and one encoding serves every epoch.
The denoiser trains on latents as it would on pixels (`batch['image']` holds them); its samples are decoded with the
same VAE. The VAE never enters the trained state.

The cache holds one record per training example in source order: the unscaled latent, the tokens of its caption,
label and valid, and with a frozen text tower (`text.clip_workdir`) the caption's token states and pooled embedding,
so a cached run runs neither encoder. Captions are drawn once, when the cache is written (one template per image);
random flips are not applied. meta.json records the settings it was made with; shards are committed one at a time,
so an interrupted encode resumes at the first missing shard, a complete cache is never encoded again, and a cache
made with other settings is a ConfigError. On several hosts process 0 writes it (on a filesystem all of them see)
while the others wait.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import ml_collections
import msgpack
import numpy as np
from absl import logging

from diffusion_jax.config import ConfigError
from diffusion_jax.data import pipeline, records
from diffusion_jax.data.sources import make_source
from diffusion_jax.tasks import frozen

CACHE_FORMAT = 1
META_FILE = "meta.json"
SCALE_FILE = "latent_scale.json"


@dataclasses.dataclass(frozen=True)
class LatentOptions:
  vae_workdir: str
  vae_pretrained: str
  scaling_factor: float
  cache: bool
  cache_dir: str
  cache_batch_size: int
  shard_size: int
  scale_examples: int


def options(config) -> LatentOptions | None:
  """The `latent` section of `config`, checked; None for pixel diffusion."""
  s = config.get("latent") or {}
  workdir, folder = s.get("vae_workdir", ""), s.get("vae_pretrained", "")
  if not workdir and not folder:
    if s.get("cache", False):
      raise ConfigError("latent.cache=True needs a VAE and neither latent.vae_workdir (a finished autoencoder run) "
                        "nor latent.vae_pretrained (a diffusers vae/ folder) is set")
    return None
  if workdir and folder:
    raise ConfigError("set one of latent.vae_workdir and latent.vae_pretrained, not both")
  opts = LatentOptions(
      vae_workdir=os.path.abspath(workdir) if workdir else "", vae_pretrained=os.path.abspath(folder) if folder else "",
      scaling_factor=float(s.get("scaling_factor", 0.0)), cache=bool(s.get("cache", False)),
      cache_dir=s.get("cache_dir", ""), cache_batch_size=int(s.get("cache_batch_size", 256)),
      shard_size=int(s.get("shard_size", 10000)), scale_examples=int(s.get("scale_examples", 2048)))
  if opts.scaling_factor < 0 or min(opts.cache_batch_size, opts.shard_size, opts.scale_examples) <= 0:
    raise ConfigError("latent.scaling_factor must be >= 0 and latent.cache_batch_size, shard_size and "
                      "scale_examples positive")
  return opts


def encode_row(row: dict[str, np.ndarray]) -> bytes:
  """One cache record: named arrays as msgpack (never pickle: decoding must not run code)."""
  return msgpack.packb({k: [str(v.dtype), list(v.shape), np.ascontiguousarray(v).tobytes()]
                        for k, v in row.items()}, use_bin_type=True)


def decode_row(data: bytes) -> dict[str, np.ndarray]:
  return {k: np.frombuffer(raw, dtype).reshape(shape) for k, (dtype, shape, raw) in msgpack.unpackb(data).items()}


class _Moments:
  """Running count, sum and sum of squares, for the std of all latent values (combinable across shards)."""

  def __init__(self, count=0, total=0.0, squares=0.0):
    self.count, self.total, self.squares = int(count), float(total), float(squares)

  def add(self, x: np.ndarray) -> None:
    x = x.astype(np.float64)
    self.count, self.total, self.squares = self.count + x.size, self.total + x.sum(), self.squares + (x * x).sum()

  def merge(self, other: _Moments) -> None:
    self.count, self.total, self.squares = (self.count + other.count, self.total + other.total,
                                            self.squares + other.squares)

  def std(self) -> float:
    mean = self.total / max(self.count, 1)
    return float(np.sqrt(max(self.squares / max(self.count, 1) - mean * mean, 1e-12)))


class CacheSource:
  """The cache's records as model rows: the latent, scaled, becomes 'image' (see `pipeline.make_rows_dataset`)."""

  def __init__(self, paths: list[str], scale: float, shift: float):
    import grain
    self._reader = grain.sources.ArrayRecordDataSource(paths)
    self._scale, self._shift = np.float32(scale), np.float32(shift)

  def __len__(self) -> int:
    return len(self._reader)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    row = decode_row(self._reader[index])
    row["image"] = (row.pop("latent") - self._shift) * self._scale
    return row


class LatentSpace:
  """The frozen VAE of a latent-diffusion run, its latents' scale and the optional latent cache."""

  def __init__(self, config, opts: LatentOptions):
    self.config, self.opts = config, opts
    if opts.vae_workdir:
      from diffusion_jax.tasks.base import get_task
      self._saved, self._step = frozen.run_config(opts.vae_workdir, "latent.vae_workdir", task="autoencoder")
      self.vae_config = get_task(self._saved).vae_config
      self.identity = {"vae_workdir": opts.vae_workdir, "vae_step": self._step}
    else:
      from diffusion_jax.pretrained import vae as pretrained_vae, weights
      if not os.path.isdir(opts.vae_pretrained):
        raise ConfigError(f"latent.vae_pretrained={opts.vae_pretrained!r} is not a folder")
      self.vae_config = pretrained_vae.config_from_diffusers(weights.read_config(opts.vae_pretrained))
      self.identity = {"vae_pretrained": opts.vae_pretrained}
    d, v = config.data, self.vae_config
    if v.in_channels != d.channels:
      raise ConfigError(f"the VAE takes {v.in_channels} channels but data.channels={d.channels}")
    if d.image_size % v.downsample_factor:
      raise ConfigError(f"data.image_size={d.image_size} is not a multiple of the VAE's downsampling factor "
                        f"{v.downsample_factor}")
    size = d.image_size // v.downsample_factor
    self.shape = (size, size, v.latent_channels)  # what the denoiser sees
    self.shift = float(v.shift_factor or 0.0)
    self.images_encoded = 0  # how many images this process has run through the encoder (tests check a cache hit)
    self._model = None
    self._scales: dict[str, float] = {}
    # Restored now, outside any mesh context: restoring lazily inside the trainer's evaluation (under its
    # `jax.set_mesh`) made the VAE's logical axis names reach the mesh unresolved.
    self._vae()

  # ------------------------------------------------------------------ the VAE
  def _vae(self) -> frozen.FrozenModel:
    if self._model is None:
      if self.opts.vae_workdir:
        module = frozen.restore_model(self.opts.vae_workdir, self._saved, self.config, self._step).vae
      else:
        from diffusion_jax import pretrained
        module = pretrained.load(self.opts.vae_pretrained)
      model = frozen.FrozenModel(module)
      self._encode = model.jit(lambda vae, x: vae.encode(x).mean)
      self._decode = model.jit(lambda vae, z: vae.decode(z))
      self._model = model
    return self._model

  def encode(self, images: np.ndarray) -> np.ndarray:
    """Unscaled latents (posterior means) of NHWC images in [-1, 1]."""
    self._vae()
    self.images_encoded += len(images)
    return np.asarray(self._encode(np.asarray(images, np.float32)))

  def decode(self, latents: np.ndarray, scale: float) -> np.ndarray:
    """Images in [-1, 1] from the denoiser's (scaled) latents."""
    self._vae()
    z = np.asarray(latents, np.float32) / np.float32(scale) + np.float32(self.shift)
    return np.clip(np.asarray(self._decode(z)), -1.0, 1.0)

  def to_latents(self, batch: dict, scale: float) -> dict:
    """A pixel batch of the data pipeline with 'image' replaced by scaled latents."""
    latents = (self.encode(batch["image"]) - np.float32(self.shift)) * np.float32(scale)
    return dict(batch, image=latents.astype(np.float32))

  # ------------------------------------------------------------------ the scale
  def scale(self, workdir: str, *, estimate=None) -> float:
    """The latents' scaling factor: the config's, else the one recorded in `workdir`, else `estimate()`'s.

    `estimate` (training only) returns the std of the training latents; without it a missing record is an error.
    """
    if self.opts.scaling_factor > 0:
      return self.opts.scaling_factor
    path = os.path.join(workdir, SCALE_FILE)
    if path in self._scales:
      return self._scales[path]
    if os.path.exists(path):
      with open(path) as f:
        record = json.load(f)
      if record["vae"] != self.identity:
        raise ConfigError(f"{path} holds the scale of another VAE ({record['vae']}); use a new workdir or set "
                          "latent.scaling_factor")
    elif estimate is None:
      raise ConfigError(f"latent.scaling_factor=0 and {path} does not exist: the first training run estimates "
                        "the scale there (or set latent.scaling_factor)")
    else:
      std, count = estimate()
      record = {"scaling_factor": 1.0 / std, "latent_std": std, "values": count, "vae": self.identity}
      logging.info("latent scale 1/std = %.5f, from %d latent values", record["scaling_factor"], count)
      if jax.process_index() == 0:
        _write_json(path, record)
    self._scales[path] = float(record["scaling_factor"])
    return self._scales[path]

  def _estimate_from_images(self, seed: int) -> tuple[float, int]:
    """The std of the first `scale_examples` training images' latents (every process computes the same)."""
    d = self.config.data
    batch_size = min(self.opts.cache_batch_size, self.opts.scale_examples)
    ds = pipeline.make_dataset(d, d.train_split, global_batch_size=batch_size, seed=seed, shuffle=False,
                               repeat=False, drop_remainder=False)
    moments, seen = _Moments(), 0
    for batch in ds:
      valid = batch["valid"] > 0
      moments.add(self.encode(batch["image"])[valid] - self.shift)
      seen += int(valid.sum())
      if seen >= self.opts.scale_examples:
        break
    if not moments.count:
      raise ConfigError("no valid training image to estimate latent.scaling_factor from")
    return moments.std(), moments.count

  # ------------------------------------------------------------------ training data
  def train_dataset(self, workdir: str, text_tower, *, global_batch_size: int, seed: int, process_index: int,
                    process_count: int):
    """Training batches with scaled latents in 'image' (and frozen text states), from the cache or encoded."""
    if self.opts.cache:
      cache_dir = self.opts.cache_dir or os.path.join(workdir, "latent_cache")
      meta = self.ensure_cache(cache_dir, seed, text_tower)
      scale = self.scale(workdir, estimate=lambda: (meta["latent_std"], meta["latent_values"]))
      paths = [os.path.join(cache_dir, s["file"]) for s in meta["shards"]]
      return pipeline.make_rows_dataset(CacheSource(paths, scale, self.shift), global_batch_size=global_batch_size,
                                        seed=seed, process_index=process_index, process_count=process_count)
    scale = self.scale(workdir, estimate=lambda: self._estimate_from_images(seed))
    d = self.config.data
    ds = pipeline.make_dataset(d, d.train_split, global_batch_size=global_batch_size, seed=seed,
                               process_index=process_index, process_count=process_count)
    return ds.map(lambda batch: with_text_states(self.to_latents(batch, scale), text_tower))

  # ------------------------------------------------------------------ the cache
  def cache_settings(self, text_tower) -> dict:
    d = self.config.data
    return {"format": CACHE_FORMAT, "latent": "posterior mean, unscaled", "latent_shape": list(self.shape),
            "vae": self.identity, "text_tower": text_tower.identity if text_tower is not None else None,
            "data": {k: _plain(d[k]) for k in ("source", "path", "tfds_name", "tfds_caption_key", "train_split",
                                                "image_size", "channels", "caption_templates", "class_names",
                                                "tokenizer", "max_text_len")}}

  def ensure_cache(self, cache_dir: str, seed: int, text_tower) -> dict:
    """The complete cache's meta.json, after writing whatever part of the cache is missing."""
    settings = self.cache_settings(text_tower)
    meta = _read_meta(cache_dir)
    if meta is not None and meta["settings"] != settings:
      changed = sorted(k for k in settings if meta["settings"].get(k) != settings[k])
      raise ConfigError(f"the latent cache in {cache_dir} was made with other settings ({', '.join(changed)}); "
                        "delete it or set latent.cache_dir elsewhere")
    if meta is not None and meta["complete"]:
      logging.info("reading %d cached latents from %s", meta["examples"], cache_dir)
      return meta
    if jax.process_index() == 0:
      self._write_cache(cache_dir, settings, meta, seed, text_tower)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("latent cache written")
    return _read_meta(cache_dir)

  def _write_cache(self, cache_dir: str, settings: dict, meta: dict | None, seed: int, text_tower) -> None:
    d = ml_collections.ConfigDict(self.config.data.to_dict())
    d.random_flip = False
    total = len(make_source(d, d.train_split))
    batch_size = self.opts.cache_batch_size
    shard_size = -(-self.opts.shard_size // batch_size) * batch_size  # whole encoder batches per shard
    meta = meta or {"settings": settings, "complete": False, "caption_seed": seed, "shards": []}
    done = {s["index"] for s in meta["shards"]}
    os.makedirs(cache_dir, exist_ok=True)
    _write_json(os.path.join(cache_dir, META_FILE), meta)
    ds = pipeline.make_dataset(d, d.train_split, global_batch_size=batch_size, seed=seed, shuffle=False,
                               repeat=False, drop_remainder=False)
    rows, moments, t0, encoded = [], _Moments(), time.time(), 0
    logging.info("encoding %d training images into %s (%d already cached)", total,
                 cache_dir, sum(s["examples"] for s in meta["shards"]))
    for i, batch in enumerate(ds):
      start = i * batch_size
      index = start // shard_size
      if index in done:
        continue  # reading the images again is cheap; encoding them is what the cache saves
      n = min(batch_size, total - start)  # the last batch is padded past the end of the split
      batch = with_text_states({k: v[:n] for k, v in self.to_latents(batch, 1.0).items()}, text_tower)
      batch["latent"] = batch.pop("image")
      moments.add(batch["latent"][batch["valid"] > 0] - self.shift)
      rows += [encode_row({k: v[j] for k, v in batch.items()}) for j in range(n)]
      encoded += n
      logging.log_every_n_seconds(logging.INFO, "latent cache: %d / %d images, %.0f images/s", 30, start + n, total,
                                  encoded / (time.time() - t0))
      if start + n == total or (start + n) % shard_size == 0:
        name = f"latents-{index:05d}.array_record"
        records.write_array_record(os.path.join(cache_dir, name + ".tmp"), rows)
        os.replace(os.path.join(cache_dir, name + ".tmp"), os.path.join(cache_dir, name))
        meta["shards"].append({"index": index, "file": name, "examples": len(rows),
                               "moments": [moments.count, moments.total, moments.squares]})
        meta["shards"].sort(key=lambda s: s["index"])
        _write_json(os.path.join(cache_dir, META_FILE), meta)  # the shard counts only once meta.json names it
        rows, moments = [], _Moments()
    everything = _Moments()
    for s in meta["shards"]:
      everything.merge(_Moments(*s["moments"]))
    meta.update(complete=True, examples=sum(s["examples"] for s in meta["shards"]), latent_std=everything.std(),
                latent_values=everything.count)
    _write_json(os.path.join(cache_dir, META_FILE), meta)
    logging.info("cached %d latents in %s: %d encoded in %.1fs", meta["examples"], cache_dir, encoded,
                 time.time() - t0)


def with_text_states(batch: dict, text_tower) -> dict:
  """Adds the frozen text tower's 'text_states' and 'text_pooled' of the batch's tokens (none without a tower)."""
  if text_tower is None:
    return batch
  states, pooled = text_tower.encode(batch["tokens"])
  return dict(batch, text_states=states, text_pooled=pooled)


def _plain(value):
  return list(value) if isinstance(value, (tuple, list)) else value


def _read_meta(cache_dir: str) -> dict | None:
  path = os.path.join(cache_dir, META_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, obj: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(path + ".tmp", path)  # a run killed while writing leaves the previous version, never half a file
