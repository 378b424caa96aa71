"""Metrics to `metrics.jsonl` and TensorBoard event files (tensorboardX: no TensorFlow needed).

Only process 0 writes; other processes get a writer that does nothing, so task code never checks.
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

import numpy as np


class MetricWriter:

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb_dir = os.path.join(workdir, "tensorboard") if enabled and tensorboard else None
    self._tb = None
    self._purge_step = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)

  def _tensorboard(self):
    # Opened on first use, so that `truncate_after` can still pass its purge step to the event writer.
    if self._tb is None and self._tb_dir is not None:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(self._tb_dir, purge_step=self._purge_step)
    return self._tb

  def truncate_after(self, step: int) -> None:
    """Forgets what was logged after `step`: call it with the step a run resumes from.

    A run killed between two checkpoints logged steps it will train again; without this they would appear twice
    in `metrics.jsonl` (and as a zigzag in TensorBoard). The file is rewritten once, atomically (a crash leaves
    the old or the new file, never half of one); TensorBoard hides the events after `step` on its own when the
    writer opens with a purge step.
    """
    if not self.enabled:
      return
    self._purge_step = int(step) + 1
    if self._tb is not None:  # reopened with the purge step on next use
      self._tb.close()
      self._tb = None
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [line for line in f if line.strip()]
    kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
    if len(kept) == len(lines):
      return
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.write("".join(line if line.endswith("\n") else line + "\n" for line in kept))
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.path)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled or not scalars:
      return
    row = {"step": int(step)}
    tb = self._tensorboard()
    for k, v in scalars.items():
      v = float(v)
      row[k] = v if math.isfinite(v) else str(v)
      if tb is not None:
        tb.add_scalar(k, v, int(step))
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if tb is not None:
      tb.flush()

  def write_image(self, step: int, tag: str, image_uint8: np.ndarray) -> None:
    tb = self._tensorboard() if self.enabled else None
    if tb is not None:
      tb.add_image(tag, np.asarray(image_uint8), int(step), dataformats="HWC")
      tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _step_of(line: str) -> int | None:
  """The step of a metrics.jsonl line; None for a line cut short by a killed run, which is dropped."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
