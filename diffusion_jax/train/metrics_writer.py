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
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled or not scalars:
      return
    row = {"step": int(step)}
    for k, v in scalars.items():
      v = float(v)
      row[k] = v if math.isfinite(v) else str(v)
      if self._tb is not None:
        self._tb.add_scalar(k, v, int(step))
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      self._tb.flush()

  def truncate_after(self, step: int) -> None:
    """Drops the rows of steps after `step` (a resumed run logs them again). Placeholder until merged."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(self.path + ".tmp", "w") as f:
      f.writelines(rows)
    os.replace(self.path + ".tmp", self.path)

  def write_image(self, step: int, tag: str, image_uint8: np.ndarray) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_image(tag, np.asarray(image_uint8), int(step), dataformats="HWC")
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
