"""The one trainer: resume equals uninterrupted, 1 device equals 8, sharded init, guards, preemption."""
import os
import signal
import threading

import jax
import numpy as np
import pytest

from diffusion_jax.train.checkpointing import Checkpointer
from diffusion_jax.train.metrics_writer import read_metrics
from diffusion_jax.train.trainer import NonFiniteError, Trainer
from tests.processes import kill_after_checkpoints
from tests.toy_task import toy_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(workdir):
  return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


def _params(state):
  return [np.asarray(x) for x in jax.tree.leaves(state.params)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  state = Trainer(toy_config(**{"mesh.shape": (1, 1, 1)}), workdir).train()
  return workdir, state


def test_uninterrupted_run_logs_every_step_and_checkpoints(uninterrupted):
  workdir, state = uninterrupted
  assert int(state.step) == 6
  assert sorted(_losses(workdir)) == [1, 2, 3, 4, 5, 6]
  assert Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [3, 6]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "tensorboard")))
  rows = read_metrics(workdir)
  assert all("perf/steps_per_sec" in r for r in rows if r["step"] > 1 and "train/loss" in r)


def test_resume_on_another_mesh_matches_uninterrupted(uninterrupted, tmp_path):
  """Stop at step 3 on 8 devices, resume on a 2×2 mesh: same losses and parameters as one 1-device run."""
  ref_dir, ref_state = uninterrupted
  workdir = str(tmp_path)
  first = Trainer(toy_config(**{"mesh.shape": (8, 1, 1)}), workdir).train(stop_at=3)
  assert int(first.step) == 3
  resumed = Trainer(toy_config(**{"mesh.shape": (2, 2, 1)}), workdir).train()
  assert int(resumed.step) == 6
  ref, got = _losses(ref_dir), _losses(workdir)
  assert sorted(got) == sorted(ref)
  np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=2e-5)
  for a, b in zip(_params(resumed), _params(ref_state)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_one_device_equals_eight_devices(uninterrupted, tmp_path):
  ref_dir, _ = uninterrupted
  Trainer(toy_config(**{"mesh.shape": (-1, 1, 1)}), str(tmp_path)).train(stop_at=4)
  ref, got = _losses(ref_dir), _losses(str(tmp_path))
  assert jax.device_count() == 8
  np.testing.assert_allclose([got[s] for s in (1, 2, 3, 4)], [ref[s] for s in (1, 2, 3, 4)], rtol=2e-5)


def test_parameters_are_born_sharded_under_fsdp_rules(tmp_path):
  rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", None))
  trainer = Trainer(toy_config(**{"mesh.shape": (2, 4, 1), "sharding.rules": rules}), str(tmp_path))
  state = trainer.init_state()
  kernel = state.params["main"]["fc1"]["kernel"][...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert kernel.addressable_shards[0].data.shape == (64 // 4, 32)
  mu = jax.tree.leaves(state.opt_state)[1:]
  assert any(getattr(x, "sharding", None) is not None and x.sharding.spec == kernel.sharding.spec for x in mu)


def test_non_finite_loss_stops_with_the_step(tmp_path):
  config = toy_config(**{"optim.lr": 1e30, "optim.warmup_steps": 0, "optim.schedule": "constant",
                         "optim.grad_clip": 0.0, "train.steps": 20, "mesh.shape": (1, 1, 1)})
  with pytest.raises(NonFiniteError, match=r"at step \d+"):
    Trainer(config, str(tmp_path)).train()


def test_sigterm_saves_a_checkpoint_and_returns(tmp_path):
  config = toy_config(**{"train.steps": 100000, "train.checkpoint_every": 100000, "mesh.shape": (1, 1, 1),
                         "train.log_every": 1000})
  trainer = Trainer(config, str(tmp_path))
  timer = threading.Timer(8.0, lambda: os.kill(os.getpid(), signal.SIGTERM))
  timer.start()
  try:
    state = trainer.train()
  finally:
    timer.cancel()
  step = int(state.step)
  assert 0 < step < 100000
  assert Checkpointer(os.path.join(str(tmp_path), "checkpoints")).latest_step() == step


_KILL_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import tests.conftest
from diffusion_jax.train.trainer import Trainer
from tests.toy_task import toy_config
Trainer(toy_config(**{{"train.steps": 100000, "train.checkpoint_every": 5, "mesh.shape": (1, 1, 1),
                     "train.log_every": 5}}), {workdir!r}).train()
"""


def test_sigkill_never_leaves_an_unloadable_checkpoint(tmp_path):
  workdir = str(tmp_path)
  kill_after_checkpoints(_KILL_SCRIPT.format(repo=REPO, workdir=workdir), workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  latest = Checkpointer(ckpt_dir).latest_step()
  assert latest is not None and latest >= 5
  config = toy_config(**{"train.steps": latest + 2, "mesh.shape": (1, 1, 1)})
  state = Trainer(config, workdir).train()
  assert int(state.step) == latest + 2
