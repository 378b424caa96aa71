"""Trainer 2.0's state: several named updates in one step (a toy GAN with n_critic and two optimizers), mutable
state (batch statistics), EMA of some parts only — trained, checkpointed, SIGKILLed and resumed, on 1 and 8 devices."""
import os

import jax
import numpy as np
import pytest

from diffusion_jax.config import ConfigError
from diffusion_jax.train import parts
from diffusion_jax.train.checkpointing import Checkpointer
from diffusion_jax.train.metrics_writer import read_metrics
from diffusion_jax.train.trainer import Trainer
from tests.processes import kill_after_checkpoints
from tests.toy_task import toy_config, toy_gan_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_DEVICE = {"mesh.shape": (1, 1, 1)}


def _rows(workdir, key):
  return {r["step"]: r[key] for r in read_metrics(workdir) if key in r}


def _arrays(tree):
  return {k: np.asarray(v) for k, v in parts.flat_names(tree).items()}


@pytest.fixture(scope="module")
def gan(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("gan"))
  trainer = Trainer(toy_gan_config(**{"mesh.shape": (1, 1, 1)}), workdir)
  return workdir, trainer, trainer.train()


def test_each_update_has_its_parameters_optimizer_and_metrics(gan):
  workdir, trainer, state = gan
  assert sorted(state.params) == ["critic", "generator"]
  assert {n.split(".")[0] for n in parts.flat_names(state.params["critic"])} == {"critic"}
  assert {n.split(".")[0] for n in parts.flat_names(state.params["generator"])} == {"generator"}
  assert list(state.ema) == ["generator"]  # ema.updates = ('generator',)
  # The generator's BatchNorm statistics are mutable state, carried and updated by every step.
  stats = _arrays(state.mutable)
  assert stats and all(".norms." in n and n.rsplit(".", 1)[1] in ("mean", "var") for n in stats)
  assert any(np.abs(v).max() > 0 for k, v in stats.items() if k.endswith("mean"))
  # n_critic = 2: the critic's optimizer stepped twice per train step, the generator's once.
  count = lambda tree: max(int(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
                           if "count" in jax.tree_util.keystr(p))
  assert count(state.opt_state["critic"]) == 12 and count(state.opt_state["generator"]) == 6
  rows = read_metrics(workdir)[-1]
  for key in ("train/critic/loss", "train/critic/grad_norm", "train/critic/lr", "train/generator/loss",
              "train/generator/grad_norm", "train/generator/lr"):
    assert np.isfinite(rows[key]), key
  assert rows["train/critic/rows"] == 16  # each critic update saw its own half of the batch of 32
  assert rows["train/critic/lr"] == pytest.approx(2e-3) and rows["train/generator/lr"] == pytest.approx(1e-3)


def test_an_update_moves_only_its_own_parameters(tmp_path):
  """With the generator's learning rate at zero, its parameters stay put while the critic trains (and vice versa):
  each update's gradients reach only its parameters."""
  for frozen_update, section in (("generator", "optim.lr"), ("critic", "critic_optim.lr")):
    trainer = Trainer(toy_gan_config(**{"mesh.shape": (1, 1, 1), section: 0.0, "train.steps": 2}),
                      str(tmp_path / frozen_update))
    ckpt = trainer.checkpointer()
    start, _ = trainer.restore_or_init(ckpt)
    ckpt.close()
    before = {name: _arrays(p) for name, p in start.params.items()}
    end = trainer.train()
    for name in ("critic", "generator"):
      after = _arrays(end.params[name])
      moved = any(not np.array_equal(after[k], before[name][k]) for k in after)
      assert moved == (name != frozen_update), (frozen_update, name)


@pytest.mark.parametrize("strategy, shape", [("data", (8, 1, 1)), ("fsdp", (1, 8, 1))])
def test_gan_gives_the_same_losses_on_one_and_eight_devices_and_resumes_on_four(gan, tmp_path, strategy, shape):
  """Stopped at step 3 on 8 devices (data parallel or FSDP), resumed on a 2×2 mesh: the losses, parameters, EMA and
  batch statistics of the one-device run."""
  ref_dir, _, ref_state = gan
  overrides = {"sharding.strategy": strategy, "sharding.min_sharded_size": 0}
  Trainer(toy_gan_config(**overrides, **{"mesh.shape": shape}), str(tmp_path)).train(stop_at=3)
  assert jax.device_count() == 8
  state = Trainer(toy_gan_config(**overrides, **{"mesh.shape": (2, 2, 1)}), str(tmp_path)).train()
  for key in ("train/critic/loss", "train/generator/loss"):
    ref, got = _rows(ref_dir, key), _rows(str(tmp_path), key)
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [ref[s] for s in range(1, 7)], rtol=2e-5)
  for tree in ("params", "ema", "mutable"):
    a, b = _arrays(getattr(state, tree)), _arrays(getattr(ref_state, tree))
    for k in b:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=f"{tree}.{k}")


def test_accumulated_micro_batches_give_each_update_the_full_batch_gradients(tmp_path):
  """Without batch statistics the toy GAN's losses are means over rows: two micro-batches per update give the same
  training as one batch, for both players and the critic's two repeats."""
  runs = {}
  for steps in (1, 2):
    wd = str(tmp_path / f"accum{steps}")
    runs[steps] = Trainer(toy_gan_config(**{"mesh.shape": (1, 1, 1), "toy.batch_norm": False,
                                            "train.grad_accum_steps": steps, "train.steps": 3}), wd).train()
    runs[steps] = (runs[steps], wd)
  for key in ("train/critic/loss", "train/generator/loss"):
    np.testing.assert_allclose(list(_rows(runs[2][1], key).values()), list(_rows(runs[1][1], key).values()),
                               rtol=1e-5)
  a, b = _arrays(runs[2][0].params), _arrays(runs[1][0].params)
  for k in b:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_a_non_finite_update_stops_the_run(tmp_path):
  from diffusion_jax.train.trainer import NonFiniteError
  config = toy_gan_config(**{"mesh.shape": (1, 1, 1), "critic_optim.lr": 1e30, "critic_optim.grad_clip": 0.0,
                             "train.steps": 30, "train.checkpoint_every": 1})
  with pytest.raises(NonFiniteError, match="at step"):
    Trainer(config, str(tmp_path)).train()


_KILL_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import tests.conftest
from diffusion_jax.train.trainer import Trainer
from tests.toy_task import toy_gan_config
Trainer(toy_gan_config(**{{"train.steps": 100000, "train.checkpoint_every": 2, "mesh.shape": (1, 1, 1),
                          "train.log_every": 1}}), {workdir!r}).train()
"""


def test_sigkilled_gan_resumes_to_the_losses_of_an_uninterrupted_run(tmp_path):
  workdir = str(tmp_path / "killed")
  kill_after_checkpoints(_KILL_SCRIPT.format(repo=REPO, workdir=workdir), workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  latest = Checkpointer(ckpt_dir).latest_step()
  assert latest is not None and latest >= 2
  total = latest + 4
  resumed = Trainer(toy_gan_config(**{"train.steps": total, "mesh.shape": (1, 1, 1)}), workdir).train()
  ref_dir = str(tmp_path / "uninterrupted")
  ref = Trainer(toy_gan_config(**{"train.steps": total, "mesh.shape": (1, 1, 1)}), ref_dir).train()
  for key in ("train/critic/loss", "train/generator/loss"):
    got, want = _rows(workdir, key), _rows(ref_dir, key)
    assert sorted(got) == list(range(1, total + 1))  # no step logged twice after the resume
    np.testing.assert_allclose([got[s] for s in range(1, total + 1)], [want[s] for s in range(1, total + 1)],
                               rtol=1e-5)
  for tree in ("params", "ema", "mutable"):
    a, b = _arrays(getattr(resumed, tree)), _arrays(getattr(ref, tree))
    for k in b:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=f"{tree}.{k}")


def test_batch_statistics_train_evaluate_with_running_averages_and_resume_bit_identically(tmp_path):
  overrides = {"task": "toy_batchnorm", "mesh.shape": (1, 1, 1), "evals.norm.type": "first_prediction"}
  ref_dir, wd = str(tmp_path / "ref"), str(tmp_path / "resumed")
  ref = Trainer(toy_config(**overrides), ref_dir).train()
  Trainer(toy_config(**overrides), wd).train(stop_at=3)
  resumed = Trainer(toy_config(**overrides), wd).train()
  assert _rows(wd, "train/loss") == _rows(ref_dir, "train/loss")
  for tree in ("params", "mutable", "ema"):
    a, b = _arrays(getattr(resumed, tree)), _arrays(getattr(ref, tree))
    assert a.keys() == b.keys() and a
    for k in b:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{tree}.{k}")
  # Evaluation runs the model in evaluation mode: the running statistics, not the statistics of its input batch.
  stats = _arrays(ref.mutable)
  params = _arrays(ref.ema["main"])
  x = np.ones((1, 64), np.float32)
  h = x @ params["layers.0.kernel"]
  h = (h - stats["norms.0.mean"]) / np.sqrt(stats["norms.0.var"] + 1e-5) * params["norms.0.scale"] + params[
      "norms.0.bias"]
  h = np.where(h > 0, h, 0.2 * h)
  expected = (h @ params["layers.1.kernel"] + params["layers.1.bias"])[0, 0]
  assert _rows(ref_dir, "eval/first_prediction")[6] == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.parametrize("overrides, message", [
    ({"ema.updates": ("discriminator",)}, "ema.updates names"),
    ({"toy.n_critic": 0}, "repeat=0"),
    ({"toy.n_critic": 3}, "does not split into the 3 repeats"),
    ({"train.frozen": ("critic[.]", "genrator[.]")}, r"train.frozen: 'genrator\[.\]' matches no parameter"),
])
def test_bad_update_settings_are_config_errors(overrides, message):
  with pytest.raises(ConfigError, match=message):
    Trainer(toy_gan_config(**overrides), "/nonexistent")


def test_a_trainable_parameter_without_an_update_is_named():
  from tests.toy_task import ToyGAN
  config = toy_gan_config(**{"ema.updates": ()})
  task = ToyGAN(config)
  task.updates = lambda: (parts.Update("critic", task.critic_loss, params=parts.under("critic")),)
  with pytest.raises(ConfigError, match=r"parameter generator\.layers\.0\.kernel is trainable but no update"):
    Trainer(config, "/nonexistent", task=task)


def test_periodic_evaluation_compiles_its_function_once(tmp_path):
  trainer = Trainer(toy_config(**ONE_DEVICE, **{"task": "toy_batchnorm", "evals.norm.type": "first_prediction",
                                                "train.eval_every": 2}), str(tmp_path))
  trainer.train()
  evals = [r["step"] for r in read_metrics(str(tmp_path)) if "eval/first_prediction" in r]
  assert evals == [2, 4, 6]
  (jitted,) = trainer._jit_cache.values()
  assert jitted._cache_size() == 1  # one compiled program served all three evaluations
