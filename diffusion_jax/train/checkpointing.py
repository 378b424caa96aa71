"""Orbax checkpoints: the train state as named items, the data-iterator position, the config and weight sources.

Items of a step: `params`, `opt` (step and optimizer states), `ema` and `mutable` when the run has them, `data`
(the iterator position), `config` (the resolved config JSON, which another run reads to rebuild this run's model)
and `sources` (where frozen weights came from, `train.runs`). A run reused as a frozen part restores `params` or
`ema` and `mutable` alone, never the optimizer moments.

Saves are asynchronous and atomic (Orbax commits a step only once every file is written), so a run killed at any
moment resumes from the newest complete step. Restores take a target of `jax.ShapeDtypeStruct`s carrying the
shardings of the *current* mesh, so a run may resume on another number of devices than it was saved from.
A checkpoint that does not fit the model is refused by parameter name; one that cannot be read is set aside (renamed,
never deleted) and the next older one is used.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging

from diffusion_jax.config import ConfigError
from diffusion_jax.train.parts import flat_names
from diffusion_jax.train.state import TrainState

FORMAT = 2
_JSON_ITEMS = ("data", "config", "sources")
_STATE_ITEMS = ("params", "opt", "ema", "mutable")


class CheckpointMismatch(ConfigError):
  """The checkpoint was written by another model than the config builds; the message names the parameters."""


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, create: bool = True):
    self.directory = os.path.abspath(directory)
    self._options = dict(max_to_keep=keep, async_save=async_save, create=create)
    self._manager = self._make_manager()

  def _make_manager(self) -> ocp.CheckpointManager:
    o = self._options
    options = ocp.CheckpointManagerOptions(max_to_keep=o["max_to_keep"], create=o["create"],
                                           enable_async_checkpointing=o["async_save"])
    handlers = {name: ocp.StandardCheckpointHandler() for name in _STATE_ITEMS}
    handlers.update({name: ocp.JsonCheckpointHandler() for name in _JSON_ITEMS})
    return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: TrainState, *, data_state: Optional[dict], config_json: str,
           sources: Optional[list] = None, wait: bool = False) -> None:
    items = {"params": ocp.args.StandardSave(state.params),
             "opt": ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
             "config": ocp.args.JsonSave(json.loads(config_json)),
             "sources": ocp.args.JsonSave({"format": FORMAT, "sources": sources or []})}
    if state.ema:
      items["ema"] = ocp.args.StandardSave(state.ema)
    if jax.tree.leaves(state.mutable):
      items["mutable"] = ocp.args.StandardSave(state.mutable)
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    if wait:
      self._manager.wait_until_finished()
    logging.info("checkpoint for step %d %s", step, "written" if wait else "being written")

  def _has(self, step: int, item: str) -> bool:
    return os.path.isdir(os.path.join(self.directory, str(step), item))

  def check_format(self, step: int) -> None:
    if self._has(step, "state") and not self._has(step, "params"):
      raise ConfigError(f"the checkpoint at step {step} in {self.directory} was written by an older diffusion_jax "
                        "(one 'state' item); this version cannot resume it: train into a new workdir")

  def restore_items(self, step: int, targets: dict[str, Any]) -> dict[str, Any]:
    """The named items of `step`, each restored onto the ShapeDtypeStructs (with shardings) of its target; a JSON
    item's target is None. Raises `CheckpointMismatch` naming the parameters whose shapes or names differ."""
    self.check_format(step)
    stored = None  # every item's metadata, read once (Orbax reads all items' for each lookup)
    for name, target in targets.items():
      if target is not None and flat_names(target):
        if not self._has(step, name):
          raise CheckpointMismatch(f"the checkpoint at step {step} in {self.directory} has no {name!r}, which this "
                                   "config's model needs: the workdir belongs to another config")
        stored = stored if stored is not None else self._manager.item_metadata(step)
        self._check_fits(step, name, target, stored[name])
    args = {name: ocp.args.StandardRestore(target) if target is not None else ocp.args.JsonRestore()
            for name, target in targets.items() if self._has(step, name)}
    return dict(self._manager.restore(step, args=ocp.args.Composite(**args)))

  def _check_fits(self, step: int, item: str, target: Any, stored: Any) -> None:
    want = {k: tuple(v.shape) for k, v in flat_names(target).items()}
    have = {k: tuple(v.shape) for k, v in flat_names(stored).items()}
    if have == want:
      return
    diffs = [f"{item}.{k}: stored {have[k]}, requested {want[k]}" for k in sorted(set(have) & set(want))
             if have[k] != want[k]]
    diffs += [f"{item}.{k}: requested, not stored" for k in sorted(set(want) - set(have))]
    diffs += [f"{item}.{k}: stored, not requested" for k in sorted(set(have) - set(want))]
    more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
    raise CheckpointMismatch(f"the checkpoint at step {step} in {self.directory} holds another model than this "
                             f"config builds: {'; '.join(diffs[:3])}{more}. The workdir belongs to another config: "
                             "use a new --workdir or the config it was trained with")

  def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict]:
    """The state of `step` and its JSON items ('data', 'config', 'sources'; those the step has). All are read here,
    so that a step with an unreadable item is set aside now rather than failing a later run that reuses it."""
    targets = {"params": abstract_state.params, "opt": {"step": abstract_state.step,
                                                       "opt_state": abstract_state.opt_state},
               "data": None, "config": None, "sources": None}
    if abstract_state.ema:
      targets["ema"] = abstract_state.ema
    if jax.tree.leaves(abstract_state.mutable):
      targets["mutable"] = abstract_state.mutable
    got = self.restore_items(step, targets)
    state = TrainState(step=got["opt"]["step"], params=got["params"], opt_state=got["opt"]["opt_state"],
                       ema=got.get("ema", abstract_state.ema), mutable=got.get("mutable", abstract_state.mutable))
    return state, {name: got[name] for name in ("data", "config", "sources") if name in got}

  def restore_latest(self, abstract_state: TrainState) -> tuple[Optional[TrainState], dict]:
    """`restore` of the newest checkpoint that restores, setting aside unreadable ones; (None, {}) without any."""
    while True:
      step = self.latest_step()
      if step is None:
        return None, {}
      try:
        return self.restore(step, abstract_state)
      except ConfigError:
        raise
      except Exception as e:  # noqa: BLE001  (a truncated file or metadata: Orbax raises many kinds)
        self.set_aside(step, e)

  def set_aside(self, step: int, error: Exception) -> str:
    """Renames an unreadable step to `<step>.unreadable-<time>` (Orbax then ignores it) and says so in one line."""
    src = os.path.join(self.directory, str(step))
    dst = f"{src}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
      os.replace(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    reason = " ".join(str(error).split())[:200]
    logging.warning("checkpoint %d in %s cannot be read (%s: %s); moved to %s, falling back to an older one",
                    step, self.directory, type(error).__name__, reason, dst)
    self._manager.close()
    self._manager = self._make_manager()
    return dst

  def read_json(self, step: int, item: str) -> Optional[dict]:
    """A JSON item of `step` ('config', 'sources', 'data'); None when the step has none."""
    if not self._has(step, item):
      return None
    return self._manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]

  def read_config(self, step: int) -> dict:
    """The config saved with `step`: what another run needs to rebuild this run's model (e.g. a frozen VAE)."""
    config = self.read_json(step, "config")
    if config is None:
      raise ConfigError(f"the checkpoint at step {step} in {self.directory} has no config")
    return config

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
