"""benchmarks/scaling.py's bookkeeping: which rows run, what each worker is given, and how the table's speedup and
efficiency follow from the timings. Nothing here compiles or times a step (speed is never asserted in tests)."""
import os

import numpy as np
import pytest

from benchmarks import scaling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DIT = os.path.join(REPO, "configs", "mnist_dit.py") + ":tiny"


def _args(**kw):
  defaults = dict(devices=[1, 2, 4, 8], per_device_batch=8, global_batch=64, processes=2, process_devices=None)
  return type("Args", (), dict(defaults, **kw))


def test_rows_weak_strong_and_multiprocess():
  rows = scaling.plan_rows(_args(devices=[1, 2, 4]))
  assert rows == [("weak", 1, 1, 8), ("weak", 2, 1, 16), ("weak", 4, 1, 32),
                  ("strong", 1, 1, 64), ("strong", 2, 1, 64), ("strong", 4, 1, 64),
                  ("strong", 2, 2, 64), ("strong", 4, 2, 64)]  # no 2-process row for 1 device
  assert all(p == 1 for _, _, p, _ in scaling.plan_rows(_args(processes=1)))
  assert [r for r in scaling.plan_rows(_args(process_devices=[8])) if r[2] == 2] == [("strong", 8, 2, 64)]
  with pytest.raises(SystemExit, match="6 devices cannot be split evenly over 4 processes"):
    scaling.plan_rows(_args(processes=4, process_devices=[6]))


def test_indivisible_global_batch_is_one_clear_error():
  with pytest.raises(SystemExit, match="global batch 12, which 8 devices cannot split evenly"):
    scaling.plan_rows(_args(global_batch=12))


def test_mesh_puts_every_device_on_the_strategy_axis():
  axes = ("data", "fsdp", "tensor")
  assert scaling.mesh_shape(axes, "data", 4) == (4, 1, 1)
  assert scaling.mesh_shape(axes, "fsdp", 4) == (1, 4, 1)


def test_worker_env_sets_the_device_count_once_and_keeps_other_flags(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
  flags = scaling._worker_env(local_devices=2, processes=1)["XLA_FLAGS"].split()
  assert sorted(flags) == ["--xla_backend_optimization_level=0", "--xla_force_host_platform_device_count=2"]
  # Multi-process workers take their devices from the distributed config (jax_num_cpu_devices) instead.
  assert scaling._worker_env(local_devices=2, processes=2)["XLA_FLAGS"] == "--xla_backend_optimization_level=0"


def test_synthetic_batch_has_the_pipeline_shapes():
  config = scaling.load_config(TINY_DIT)
  batch = scaling.synthetic_batch(config, rows=4, seed=0)
  assert set(batch) == {"image", "tokens", "label", "valid"}
  assert batch["image"].shape == (4, 16, 16, 1) and batch["image"].dtype == np.float32
  assert batch["tokens"].shape == (4, config.data.max_text_len) and batch["tokens"].dtype == np.int32
  assert 0 <= batch["label"].min() and batch["label"].max() < config.model.num_classes
  np.testing.assert_array_equal(batch["valid"], 1.0)


def test_speedup_and_efficiency():
  rows = [("weak", 1, 1, 8), ("weak", 2, 1, 16), ("strong", 1, 1, 32), ("strong", 2, 1, 32), ("strong", 2, 2, 32)]
  r = lambda seconds, flops: dict(seconds=seconds, flops=flops, params=10, compile_seconds=1.0)  # FLOPs: all devices
  results = {(1, 1, 8): r(0.5, 1e9), (2, 1, 16): r(0.5, 2e9),  # weak: twice the work in the same time
             (1, 1, 32): r(1.0, 4e9), (2, 1, 32): r(1.0, 4e9),  # strong: no faster with 2 devices,
             (2, 2, 32): r(2.0, 4e9)}                             # and 2 processes twice as slow
  table = {(row[0], row[1], row[2]): row for row in scaling.table_rows(rows, results, peak=100.0)}
  # columns: mode, devices, processes, global batch, steps/s, examples/s, GFLOP/step (all devices), GFLOP/s,
  # % peak, speedup, efficiency, compile s
  assert table[("weak", 2, 1)][3:] == [16, "2.00", "32.0", "2.00", "4.00", "4.0%", "2.00×", "100%", "1.0"]
  assert table[("strong", 2, 1)][6:] == ["4.00", "4.00", "4.0%", "1.00×", "50%", "1.0"]
  assert table[("strong", 2, 2)][9:11] == ["0.500×", "25%"]


def test_trainer_step_timer_runs_the_step_the_trainer_compiles():
  # The jax-trainer rows of benchmarks/{unet,dit,clip}_train and every scaling row time this; it must call the
  # compiled step with the arguments the trainer gives it (state, frozen parameters, batch).
  from benchmarks import common
  config = scaling.load_config(TINY_DIT)
  batch = scaling.synthetic_batch(config, rows=4, seed=0)
  args = type("Args", (), dict(warmup=1, steps=1, repeats=1))
  result = common.time_trainer_step(config, batch, args)
  assert result["seconds"] > 0 and result["flops"] > 0 and result["params"] > 0 and len(result["windows"]) == 1
