"""Weights from elsewhere: finished runs of this library, pretrained folders and weight files.

A task lists its `weight_sources()`; each names the parameters it fills (dotted names under `target`). The trainer
applies them to frozen parameters at every start (they are not checkpointed) and to trainable ones only when a run
starts from scratch (a resumed run takes those from its own checkpoint).

`RunSource` restores what a finished run needs — its parameters, or its EMA parameters when it evaluates with them,
and its mutable state, never its optimizer state — from its newest checkpoint, rebuilt from the config that
checkpoint saved (through the task registry) and sharded by the *current* run's mesh and rules.

Provenance: every source describes itself as {what, kind, path, step, fingerprint} (a SHA-256 of the bytes it reads).
A run records the sources of its frozen parameters in each checkpoint and refuses to resume, in one line, when one of
them changed or disappeared since; `train.accept_changed_sources=True` accepts the change on purpose.
"""
from __future__ import annotations

import abc
import hashlib
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from diffusion_jax.config import ConfigError
from diffusion_jax.models import tracing
from diffusion_jax.parallel import mesh as mesh_lib
from diffusion_jax.train import checkpointing, parts
from diffusion_jax.train.task import get_task


def fingerprint(paths: Sequence[str], salt: str = "") -> str:
  """SHA-256 over the bytes of `paths` (files, or every file below a folder, in sorted order) and their names."""
  digest = hashlib.sha256(salt.encode())
  files = []
  for path in paths:
    if os.path.isdir(path):
      files += sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
    elif os.path.exists(path):
      files.append(path)
  base = os.path.commonpath(paths) if paths else ""
  for f in files:
    digest.update(os.path.relpath(f, base).encode())
    with open(f, "rb") as fh:
      for chunk in iter(lambda: fh.read(1 << 20), b""):
        digest.update(chunk)
  return digest.hexdigest()[:16]


class Source(abc.ABC):
  """Named arrays for the parameters (and mutable state) under `target` in the task's model.

  `what` is the config option that names it (for messages and provenance). A `frozen` source fills frozen
  parameters: it is read at every start and recorded, so a resumed run refuses one that changed; any other source
  only initialises a run from scratch. `recorded=False` marks a frozen part that only inference uses (unCLIP's
  prior inside a decoder run): it may be swapped or left out from one start to the next.
  """

  def __init__(self, what: str, path: str, target: str = "", frozen: bool = False, recorded: bool = True):
    self.what, self.path, self.target, self.frozen = what, os.path.abspath(path), target, frozen
    self.recorded = recorded

  @abc.abstractmethod
  def arrays(self, mesh, rules) -> dict[str, Any]:
    """Names relative to `target` → arrays (numpy, or jax arrays already sharded on `mesh`)."""

  @abc.abstractmethod
  def describe(self) -> dict:
    """{what, kind, path, step, fingerprint}: what a later run compares to decide whether the source changed."""

  def named(self, mesh, rules) -> dict[str, Any]:
    prefix = f"{self.target}." if self.target else ""
    return {prefix + k: v for k, v in self.arrays(mesh, rules).items()}


class ModuleSource(Source):
  """A module that `load(path)` reads (a pretrained folder or a weight file), read once and kept.

  `module()` gives the loaded module itself, for a task that takes its architecture from it.
  """

  def __init__(self, what: str, path: str, load: Callable[[str], nnx.Module], *, target: str = "",
               frozen: bool = False, expect: Optional[type] = None, select: Sequence[str] = ()):
    super().__init__(what, path, target, frozen)
    self._load, self._expect, self._select, self._module = load, expect, tuple(select), None

  def module(self) -> nnx.Module:
    if self._module is None:
      if not os.path.exists(self.path):
        raise ConfigError(f"{self.what}={self.path!r} does not exist")
      from diffusion_jax.pretrained import WeightsError
      try:
        module = self._load(self.path)
      except WeightsError as e:
        raise ConfigError(f"{self.what}: {e}") from None
      if self._expect is not None and not isinstance(module, self._expect):
        raise ConfigError(f"{self.what}={self.path!r} holds a {type(module).__name__}, not a "
                          f"{self._expect.__name__}")
      self._module = module
    return self._module

  def arrays(self, mesh, rules) -> dict[str, Any]:
    from diffusion_jax.pretrained import weights
    found = weights.model_arrays(self.module())
    return {k: v for k, v in found.items() if not self._select or _under(k, self._select)}

  def describe(self) -> dict:
    exists = os.path.exists(self.path)
    return {"what": self.what, "kind": "folder" if os.path.isdir(self.path) else "file", "path": self.path,
            "step": None, "fingerprint": fingerprint([self.path]) if exists else None}


class RunSource(Source):
  """A finished run's parameters (EMA where it evaluates with them) and mutable state, selected by name prefix.

  `task` is the task the run must have been (a one-line error otherwise); `select` keeps only names under these
  prefixes of the run's model (whole names, placed under `target` in ours); `use_ema` 'auto' follows the run's own
  `ema.use_for_eval`; `check(config)` may refuse the run's saved config with a ConfigError. Nothing is read before it
  is needed. Parameters that run kept frozen are not in its checkpoint: without `select` they are left
  out, and a `select` that names them is an error.
  """

  def __init__(self, what: str, workdir: str, *, task: str | Sequence[str], select: Sequence[str] = (),
               target: str = "", frozen: bool = False, use_ema: str | bool = "auto",
               check: Optional[Callable[[ml_collections.ConfigDict], None]] = None, recorded: bool = True):
    super().__init__(what, workdir, target, frozen, recorded)
    self._tasks = (task,) if isinstance(task, str) else tuple(task)
    self._check = check
    self._select, self._use_ema = tuple(select), use_ema
    self._config = self._step = None

  # ------------------------------------------------------------------ what the run was
  def _checkpointer(self) -> checkpointing.Checkpointer:
    directory = os.path.join(self.path, "checkpoints")
    if not os.path.isdir(directory):
      raise ConfigError(f"{self.what}={self.path!r} holds no checkpoints: train that run first")
    return checkpointing.Checkpointer(directory, async_save=False, create=False)

  def config(self) -> ml_collections.ConfigDict:
    """The config the run saved with its newest checkpoint."""
    if self._config is None:
      ckpt = self._checkpointer()
      try:
        step = ckpt.latest_step()
        if step is None:
          raise ConfigError(f"{self.what}={self.path!r} holds no complete checkpoint: train that run first")
        ckpt.check_format(step)
        config = ml_collections.ConfigDict(ckpt.read_config(step))
      finally:
        ckpt.close()
      if config.get("task") not in self._tasks:
        raise ConfigError(f"{self.what}={self.path!r} is a {config.get('task')!r} run, not a "
                          f"{' or '.join(repr(t) for t in self._tasks)} run")
      if self._check is not None:
        self._check(config)
      self._config, self._step = config, step
    return self._config

  @property
  def step(self) -> int:
    self.config()
    return self._step

  def task(self):
    """The run's task, rebuilt from its saved config (nothing is restored)."""
    return get_task(self.config())

  # ------------------------------------------------------------------ its weights
  def arrays(self, mesh, rules) -> dict[str, Any]:
    config, step = self.config(), self.step
    task = self.task()
    from diffusion_jax.train import adapters
    abstract = tracing.abstract_model(lambda: adapters.build_model(task, config, nnx.Rngs(0)))
    partition = adapters.partition(task, config)
    _, frozen, params, mutable = partition.split(abstract)
    use_ema = config.ema.use_for_eval if self._use_ema == "auto" else bool(self._use_ema)
    with_ema = set(parts.ema_updates(config.ema.updates, task.updates())) if config.ema.enabled else set()
    taken = {name for name in params if use_ema and name in with_ema}
    frozen_names = [k for k in parts.flat_names(frozen) if self._select and _under(k, self._select)]
    if frozen_names:
      raise ConfigError(f"{self.what}: {frozen_names[0]} is frozen in {self.path}, so its checkpoint does not hold "
                        "it; name that run's own source instead")
    shard = lambda tree: _abstract_sharded(tree, mesh, rules)
    targets = {"params": shard({k: v for k, v in params.items() if k not in taken}) or None,
               "ema": shard({k: v for k, v in params.items() if k in taken}) or None,
               "mutable": shard(mutable) if jax.tree.leaves(mutable) else None}
    ckpt = self._checkpointer()
    try:
      got = ckpt.restore_items(step, {k: v for k, v in targets.items() if v is not None})
    except checkpointing.CheckpointMismatch as e:
      raise ConfigError(f"{self.what}: {e}") from None
    finally:
      ckpt.close()
    out = {}
    for item in ("params", "ema"):
      for state in (got.get(item) or {}).values():
        out.update(parts.flat_names(state))
    out.update(parts.flat_names(got.get("mutable") or {}))
    logging.info("restored %s from %s at step %d (%s)", self.what, self.path, step,
                 "EMA parameters" if taken else "parameters")
    return {k: v for k, v in out.items() if not self._select or _under(k, self._select)}

  def describe(self) -> dict:
    if not os.path.isdir(os.path.join(self.path, "checkpoints")):
      return {"what": self.what, "kind": "run", "path": self.path, "step": None, "fingerprint": None}
    step_dir = os.path.join(self.path, "checkpoints", str(self.step))
    items = [os.path.join(step_dir, item) for item in ("params", "ema", "mutable")]
    return {"what": self.what, "kind": "run", "path": self.path, "step": self.step,
            "fingerprint": fingerprint([p for p in items if os.path.exists(p)], salt=str(self.step))}


def _under(name: str, prefixes: Sequence[str]) -> bool:
  return any(name == p or name.startswith(p + ".") for p in prefixes)


def _abstract_sharded(tree, mesh, rules):
  """ShapeDtypeStructs of an abstract state, sharded by its logical axes under `rules` on `mesh`."""
  specs = nnx.get_partition_spec(tree)
  is_spec = lambda x: x is None or isinstance(x, jax.sharding.PartitionSpec)

  def one(spec, x):
    spec = jax.sharding.PartitionSpec() if spec is None else spec
    fitted = mesh_lib.fit_spec(mesh_lib.logical_to_mesh(spec, rules), x.shape, mesh)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.NamedSharding(mesh, fitted))

  return jax.tree.map(one, specs, tree, is_leaf=is_spec)


def check_unchanged(recorded: Sequence[Mapping], current: Sequence[Mapping], *, accept: bool) -> None:
  """Refuses (one line) to resume when a source of frozen weights changed or disappeared since it was recorded."""
  now = {(d["what"], d["path"]): d for d in current}
  for old in recorded:
    new = now.get((old["what"], old["path"]))
    if new is None:
      problem = f"is no longer used by this config (it was {old['path']!r})"
    elif new["fingerprint"] is None:
      problem = "has disappeared"
    elif (new["step"], new["fingerprint"]) != (old["step"], old["fingerprint"]):
      steps = f"step {old['step']} → {new['step']}, " if old["step"] != new["step"] else ""
      problem = f"changed since this run started ({steps}fingerprint {old['fingerprint']} → {new['fingerprint']})"
    else:
      continue
    if accept:
      logging.warning("%s=%s %s; continuing with it as it is now (train.accept_changed_sources)", old["what"],
                      old["path"], problem)
      continue
    raise ConfigError(f"{old['what']}={old['path']!r} {problem}: the frozen weights this run trained with are gone. "
                      "Restore it, or resume with --config.train.accept_changed_sources=True to use it as it is now")


def place(arrays: Mapping[str, Any], like: Mapping[str, Any], what: str) -> dict[str, jax.Array]:
  """`arrays` (name → array) as jax arrays with the shapes, dtypes and shardings of `like`'s leaves of that name."""
  out = {}
  for name, value in arrays.items():
    leaf = like[name]
    if tuple(np.shape(value)) != tuple(leaf.shape):
      raise ConfigError(f"{what}: weight {name} has shape {tuple(np.shape(value))}, the model expects "
                        f"{tuple(leaf.shape)}")
    if isinstance(value, jax.Array) and value.dtype == leaf.dtype and value.sharding == leaf.sharding:
      out[name] = value
    else:
      out[name] = jax.device_put(np.asarray(value).astype(leaf.dtype) if not isinstance(value, jax.Array)
                                 else value.astype(leaf.dtype), leaf.sharding)
  return out
