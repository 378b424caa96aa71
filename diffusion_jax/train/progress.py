"""Console progress (steps/s, ETA, loss) and the throughput numbers logged with the metrics."""
from __future__ import annotations

import collections
import time

import numpy as np


class ProgressBar:

  def __init__(self, start: int, total: int, *, enabled: bool = True):
    self._bar = None
    if enabled:
      from tqdm import tqdm
      self._bar = tqdm(initial=start, total=total, unit="step", dynamic_ncols=True, smoothing=0.1)
    self._last = start

  def update(self, step: int, loss: float) -> None:
    if self._bar is None:
      return
    self._bar.update(step - self._last)
    self._last = step
    self._bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


class StepMeter:
  """Steps/s, examples/s and achieved FLOP/s over the last logging window (compile time excluded)."""

  def __init__(self, flops_per_step: float, batch_size: int):
    self.flops_per_step, self.batch_size = flops_per_step, batch_size
    self._t0, self._s0 = None, None

  def tick(self, step: int) -> None:
    if self._t0 is None:  # the first step includes dispatch warm-up; start timing after it
      self._t0, self._s0 = time.perf_counter(), step

  def restart(self, step: int) -> None:
    """Excludes time spent outside training steps (evaluation, sampling) from the next window."""
    self._t0, self._s0 = time.perf_counter(), step

  def rates(self, step: int) -> dict:
    if self._t0 is None or step == self._s0:
      return {}
    dt = time.perf_counter() - self._t0
    sps = (step - self._s0) / dt
    self._t0, self._s0 = time.perf_counter(), step
    out = {"perf/steps_per_sec": sps, "perf/examples_per_sec": sps * self.batch_size}
    if self.flops_per_step:
      out["perf/flops_per_sec"] = sps * self.flops_per_step
    return out


class MetricAccumulator:
  """Means of per-step metrics over a logging window; keys starting with 'count/' are summed over the run."""

  def __init__(self):
    self._sums, self._n = collections.defaultdict(float), 0
    self._totals = collections.defaultdict(float)

  def add(self, metrics: dict) -> None:
    self._n += 1
    for k, v in metrics.items():
      v = float(np.asarray(v))
      if k.startswith("count/"):
        self._totals[k] += v
      else:
        self._sums[k] += v

  def flush(self) -> dict:
    out = {k: v / max(self._n, 1) for k, v in self._sums.items()}
    out.update(self._totals)
    self._sums.clear()
    self._n = 0
    return out
