"""docs/architecture.md's worked example of a new task runs as written: two updates, EMA of one, its own evaluator."""
import os
import types

import numpy as np

from diffusion_jax.train.metrics_writer import read_metrics
from diffusion_jax.train.trainer import Trainer

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "architecture.md")


def _example() -> types.ModuleType:
  text = open(DOC).read()
  start = text.index("```python", text.index("## A new task")) + len("```python")
  code = text[start:text.index("```", start)]
  assert len(code.strip().splitlines()) < 100
  module = types.ModuleType("my_gan")
  exec(compile(code, DOC, "exec"), module.__dict__)
  return module


def test_the_documented_task_trains_and_evaluates(tmp_path):
  example = _example()
  config = example.get_config()
  config.train.update(steps=300, log_every=100, checkpoint_every=300, progress_bar=False)
  config.mesh.shape = (1, 1, 1)
  state = Trainer(config, str(tmp_path)).train()
  assert list(state.ema) == ["generator"] and sorted(state.params) == ["critic", "generator"]
  rows = read_metrics(str(tmp_path))
  assert [r["step"] for r in rows if "train/critic/loss" in r] == [100, 200, 300]
  assert all(np.isfinite(r["train/generator/loss"]) for r in rows if "train/generator/loss" in r)
  (final,) = [r for r in rows if "eval/modes_covered" in r]
  assert final["step"] == 300 and 0 <= final["eval/modes_covered"] <= 8
