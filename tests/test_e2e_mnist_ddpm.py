"""The main job as a user runs it: train → samples + eval → resume → --mode sample → finished, through the CLI; a
second sampling and --mode eval call what those modes run (Trainer.sample/evaluate) in this process.
(Its U-Net on 1 and 8 devices: tests/test_sharding_strategies.py.)"""
import json
import os

import numpy as np
from PIL import Image

from configs import mnist_ddpm
from diffusion_jax.train.metrics_writer import read_metrics
from diffusion_jax.train.trainer import Trainer
from tests.test_cli import run_cli

TINY = ["--config", "configs/mnist_ddpm.py:tiny"]


def _cli_config(**overrides):
  """configs/mnist_ddpm.py:tiny with `--config.KEY=VALUE` overrides, on one device as run_cli's processes are."""
  config = mnist_ddpm.get_config("tiny")
  config.mesh.shape = (1, 1, 1)
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def _index(path):
  with open(os.path.join(path, "index.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_train_sample_eval_and_resume_through_the_cli(tmp_path):
  wd = str(tmp_path / "run")
  proc = run_cli(*TINY, "--workdir", wd, "--config.train.eval_every=4", "--config.train.sample_every=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "compiled train step" in proc.stderr and "FLOPs/step" in proc.stderr and "total parameters" in proc.stderr
  rows = read_metrics(wd)
  train = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train] == [2, 4] and all(np.isfinite(r["train/loss"]) for r in train)
  assert any("eval/loss" in r and r["step"] == 4 for r in rows)
  assert os.listdir(os.path.join(wd, "tensorboard"))

  samples = os.path.join(wd, "samples", "step_4")
  index = _index(samples)
  assert [r["prompt"] for r in index] == [f"a handwritten digit {n}" for n in
                                         ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]
  assert [r["label"] for r in index] == list(range(10))
  for r in index:
    with Image.open(os.path.join(samples, r["file"])) as im:
      assert im.size == (16, 16)
  assert os.path.exists(os.path.join(samples, "grid.png"))

  # Resume: a longer run continues from the step-4 checkpoint instead of starting over.
  proc = run_cli(*TINY, "--workdir", wd, "--config.train.steps=6")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resuming from checkpoint at step 4" in proc.stderr
  assert [r["step"] for r in read_metrics(wd) if "train/loss" in r] == [2, 4, 6]

  # Sampling from the checkpoint with user prompts (10 images, as many as the training run's sampling: the same
  # compiled sampler, read from the tests' persistent compilation cache).
  prompts = '("a handwritten digit three", "a handwritten digit eight")'
  proc = run_cli(*TINY, "--workdir", wd, "--mode=sample", f"--config.sample.prompts={prompts}",
                 "--config.sample.per_prompt=5")
  assert proc.returncode == 0, proc.stderr[-3000:]
  index = _index(os.path.join(wd, "samples", "step_6"))
  assert [r["prompt"] for r in index] == ["a handwritten digit three"] * 5 + ["a handwritten digit eight"] * 5
  first = {name: open(os.path.join(wd, "samples", "step_6", name), "rb").read()
           for name in os.listdir(os.path.join(wd, "samples", "step_6"))}

  # Sampling again never touches the earlier folder: it gets its own, whose index lists exactly its files. (In this
  # process: what `--mode=sample` runs, Trainer.sample, on the CLI's one device.)
  trainer = Trainer(_cli_config(**{"sample.prompts": ("a handwritten digit one",), "sample.per_prompt": 10}), wd)
  trainer.sample()
  assert {name: open(os.path.join(wd, "samples", "step_6", name), "rb").read()
          for name in os.listdir(os.path.join(wd, "samples", "step_6"))} == first
  second = os.path.join(wd, "samples", "step_6_2")
  files = [r["file"] for r in _index(second)]
  assert len(files) == 10 and sorted(os.listdir(second)) == sorted(files + ["grid.png", "index.jsonl"])

  # The finished run started again: nothing to train, no traceback, exit 0 (its end-of-run work is off in :tiny).
  proc = run_cli(*TINY, "--workdir", wd, "--config.train.steps=6")
  assert proc.returncode == 0 and "nothing to train" in proc.stderr, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr

  Trainer(_cli_config(), wd).evaluate()  # what `--mode=eval` runs (test_contrastive_task runs it through the CLI)
  assert any("eval/loss" in r and r["step"] == 6 for r in read_metrics(wd))
