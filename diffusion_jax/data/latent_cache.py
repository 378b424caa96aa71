"""A cache of encoded training examples (VAE latents, frozen text states) in ArrayRecord shards.

Latent diffusion trains on a frozen VAE's latents; encoding the training split once and reading the latents back
removes the encoder from the training loop. `ensure_cache` writes one record per training example in source
order — the fields `encode` returns (e.g. the unscaled latent, a frozen text tower's states) plus tokens, label and
valid — and `CacheSource` serves them as model rows. Captions are drawn once, when the cache is written (one
template per image); random flips are not applied.

meta.json records the settings the cache was made with; shards are committed one at a time, so an interrupted
encode resumes at the first missing shard, a complete cache is never encoded again, and a cache made with other
settings is a ConfigError. On several hosts every process runs the (sharded) encoder on the same batches and
process 0 writes the files, on a filesystem all of them see.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax
import ml_collections
import msgpack
import numpy as np
from absl import logging

from diffusion_jax.config import ConfigError
from diffusion_jax.data import pipeline, records
from diffusion_jax.data.sources import make_source

CACHE_FORMAT = 1
META_FILE = "meta.json"


def encode_row(row: dict[str, np.ndarray]) -> bytes:
  """One cache record: named arrays as msgpack (never pickle: decoding must not run code)."""
  return msgpack.packb({k: [str(v.dtype), list(v.shape), np.ascontiguousarray(v).tobytes()]
                        for k, v in row.items()}, use_bin_type=True)


def decode_row(data: bytes) -> dict[str, np.ndarray]:
  return {k: np.frombuffer(raw, dtype).reshape(shape) for k, (dtype, shape, raw) in msgpack.unpackb(data).items()}


class Moments:
  """Running count, sum and sum of squares, for the std of all latent values (combinable across shards)."""

  def __init__(self, count=0, total=0.0, squares=0.0):
    self.count, self.total, self.squares = int(count), float(total), float(squares)

  def add(self, x: np.ndarray) -> None:
    x = x.astype(np.float64)
    self.count, self.total, self.squares = self.count + x.size, self.total + x.sum(), self.squares + (x * x).sum()

  def merge(self, other: Moments) -> None:
    self.count, self.total, self.squares = (self.count + other.count, self.total + other.total,
                                            self.squares + other.squares)

  def std(self) -> float:
    mean = self.total / max(self.count, 1)
    return float(np.sqrt(max(self.squares / max(self.count, 1) - mean * mean, 1e-12)))


class CacheSource:
  """The cache's records as model rows: the latent, shifted and scaled, becomes 'latents' (see
  `pipeline.make_rows_dataset`)."""

  def __init__(self, paths: list[str], scale: float, shift: float):
    import grain
    self._reader = grain.sources.ArrayRecordDataSource(paths)
    self._scale, self._shift = np.float32(scale), np.float32(shift)

  def __len__(self) -> int:
    return len(self._reader)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    row = decode_row(self._reader[index])
    row["latents"] = (row.pop("latent") - self._shift) * self._scale
    return row


def ensure_cache(cache_dir: str, settings: dict, data_cfg, *, encode: Callable[[dict], dict[str, np.ndarray]],
                 batch_size: int, shard_size: int, seed: int, shift: float = 0.0) -> dict:
  """The complete cache's meta.json, after writing whatever part of the cache is missing.

  `encode(batch)` maps a pipeline batch to per-example arrays; its 'latent' gives the moments from which the
  latents' std (`meta['latent_std']`, over `latent - shift`) is taken.
  """
  meta = check_settings(cache_dir, settings)
  if meta is not None and meta["complete"]:
    logging.info("reading %d cached latents from %s", meta["examples"], cache_dir)
    return meta
  _write_cache(cache_dir, settings, meta, data_cfg, encode, batch_size, shard_size, seed, shift)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("latent cache written")
  return read_meta(cache_dir)


def _write_cache(cache_dir: str, settings: dict, meta: dict | None, data_cfg, encode, batch_size: int,
                 shard_size: int, seed: int, shift: float) -> None:
  main = jax.process_index() == 0
  d = ml_collections.ConfigDict(data_cfg.to_dict())
  d.random_flip = False
  total = len(make_source(d, d.train_split))
  shard_size = -(-shard_size // batch_size) * batch_size  # whole encoder batches per shard
  meta = meta or {"settings": settings, "complete": False, "caption_seed": seed, "shards": []}
  done = {s["index"] for s in meta["shards"]}
  if main:
    os.makedirs(cache_dir, exist_ok=True)
    write_json(os.path.join(cache_dir, META_FILE), meta)
  ds = pipeline.make_dataset(d, d.train_split, global_batch_size=batch_size, seed=seed, shuffle=False,
                             repeat=False, drop_remainder=False)
  rows, moments, t0, encoded = [], Moments(), time.time(), 0
  if main:
    logging.info("encoding %d training images into %s (%d already cached)", total, cache_dir,
                 sum(s["examples"] for s in meta["shards"]))
  for i, batch in enumerate(ds):
    start = i * batch_size
    index = start // shard_size
    if index in done:
      continue  # reading the images again is cheap; encoding them is what the cache saves
    n = min(batch_size, total - start)  # the last batch is padded past the end of the split
    fields = {k: v[:n] for k, v in encode(batch).items()}
    fields.update({k: batch[k][:n] for k in ("tokens", "label", "valid")})
    moments.add(fields["latent"][fields["valid"] > 0] - shift)
    rows += [encode_row({k: v[j] for k, v in fields.items()}) for j in range(n)]
    encoded += n
    if main:
      logging.log_every_n_seconds(logging.INFO, "latent cache: %d / %d images, %.0f images/s", 30, start + n, total,
                                  encoded / (time.time() - t0))
    if start + n == total or (start + n) % shard_size == 0:
      name = f"latents-{index:05d}.array_record"
      if main:
        records.write_array_record(os.path.join(cache_dir, name + ".tmp"), rows)
        os.replace(os.path.join(cache_dir, name + ".tmp"), os.path.join(cache_dir, name))
      meta["shards"].append({"index": index, "file": name, "examples": len(rows),
                             "moments": [moments.count, moments.total, moments.squares]})
      meta["shards"].sort(key=lambda s: s["index"])
      if main:
        write_json(os.path.join(cache_dir, META_FILE), meta)  # the shard counts only once meta.json names it
      rows, moments = [], Moments()
  everything = Moments()
  for s in meta["shards"]:
    everything.merge(Moments(*s["moments"]))
  meta.update(complete=True, examples=sum(s["examples"] for s in meta["shards"]), latent_std=everything.std(),
              latent_values=everything.count)
  if main:
    write_json(os.path.join(cache_dir, META_FILE), meta)
    logging.info("cached %d latents in %s: %d encoded in %.1fs", meta["examples"], cache_dir, encoded,
                 time.time() - t0)


def data_settings(data_cfg) -> dict:
  """The data options a cache depends on."""
  return {k: _plain(data_cfg[k]) for k in ("source", "path", "tfds_name", "tfds_caption_key", "train_split",
                                            "image_size", "channels", "caption_templates", "class_names",
                                            "tokenizer", "max_text_len")}


def shard_paths(cache_dir: str, meta: dict) -> list[str]:
  return [os.path.join(cache_dir, s["file"]) for s in meta["shards"]]


def _plain(value):
  return list(value) if isinstance(value, (tuple, list)) else value


def check_settings(cache_dir: str, settings: dict) -> dict | None:
  """The meta.json of the cache in `cache_dir` (None: no cache yet); a ConfigError if it was made with other
  settings."""
  meta = read_meta(cache_dir)
  if meta is not None and meta["settings"] != settings:
    changed = sorted(k for k in settings if meta["settings"].get(k) != settings[k])
    raise ConfigError(f"the latent cache in {cache_dir} was made with other settings ({', '.join(changed)}); "
                      "delete it or set latent.cache_dir elsewhere")
  return meta


def read_meta(cache_dir: str) -> dict | None:
  path = os.path.join(cache_dir, META_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(path + ".tmp", path)  # a run killed while writing leaves the previous version, never half a file
