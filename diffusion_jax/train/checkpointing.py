"""Orbax checkpoints of the train state, the data-iterator position and the config.

Saves are asynchronous and atomic (Orbax commits a step only once every file is written), so a run
killed at any moment resumes from the newest complete step. Restores take a target of
`jax.ShapeDtypeStruct`s carrying the shardings of the *current* mesh, so a run may resume on a different
number of devices than it was saved from.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, data_state: Optional[dict], config_json: str, wait: bool = False) -> None:
    items = {
        "state": ocp.args.StandardSave(state),
        "config": ocp.args.JsonSave(json.loads(config_json)),
    }
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    if wait:
      self._manager.wait_until_finished()
    logging.info("checkpoint for step %d %s", step, "written" if wait else "being written")

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, Optional[dict]]:
    """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if os.path.isdir(os.path.join(self.directory, str(step), "data")):
      items["data"] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored.get("data") if "data" in items else None

  def read_config(self, step: int) -> dict:
    """The config saved with `step`: what another run needs to rebuild this run's model (e.g. a frozen VAE)."""
    return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
