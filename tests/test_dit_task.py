"""The diffusion task with a class-conditional DiT (configs/mnist_dit.py): the CLI run, the rectified-flow objective,
1-vs-8-device equality and resume; the flow loss against a hand computation."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.mnist_dit import get_config
from diffusion_jax.config import ConfigError
from diffusion_jax.models.conditioners import ClassConditioner
from diffusion_jax.models.denoiser import DiffusionModel
from diffusion_jax.train.task import get_task
from diffusion_jax.train.metrics_writer import read_metrics
from tests.test_cli import run_cli


def _index(path):
  with open(os.path.join(path, "index.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_cli_trains_samples_with_labels_and_resumes(tmp_path):
  wd = str(tmp_path / "run")
  proc = run_cli("--config", "configs/mnist_dit.py:tiny", "--workdir", wd, "--config.train.sample_at_end=True")
  assert proc.returncode == 0, proc.stderr[-3000:]
  train = [r for r in read_metrics(wd) if "train/loss" in r]
  assert [r["step"] for r in train] == [2, 4] and all(np.isfinite(r["train/loss"]) for r in train)
  index = _index(os.path.join(wd, "samples", "step_4"))
  assert [r["label"] for r in index] == list(range(10))

  proc = run_cli("--config", "configs/mnist_dit.py:tiny", "--workdir", wd, "--config.train.steps=6")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resuming from checkpoint at step 4" in proc.stderr
  assert [r["step"] for r in read_metrics(wd) if "train/loss" in r] == [2, 4, 6]


@pytest.fixture(scope="module")
def flow_runs(tmp_path_factory):
  """Workdirs of a tiny flow DiT trained 3 steps on 1 and on 8 devices (the 8-device run is the reflow tests'
  teacher too)."""
  from diffusion_jax.train.trainer import Trainer
  base = tmp_path_factory.mktemp("flow")
  out = {}
  for devices in (1, 8):
    config = get_config("flow,tiny")
    config.mesh.shape = (devices, 1, 1)
    config.train.steps, config.train.log_every, config.train.checkpoint_every = 3, 1, 100
    config.train.sample_at_end = devices == 1
    out[devices] = str(base / f"devices_{devices}")
    Trainer(config, out[devices]).train()
  return out


def test_flow_dit_trains_and_samples_with_equal_losses_on_one_and_eight_devices(flow_runs):
  losses = {devices: [r["train/loss"] for r in read_metrics(wd) if "train/loss" in r]
            for devices, wd in flow_runs.items()}
  assert len(losses[1]) == 3 and all(np.isfinite(losses[1]))
  np.testing.assert_allclose(losses[8], losses[1], rtol=1e-4)
  samples = os.path.join(flow_runs[1], "samples", "step_3")
  assert [r["label"] for r in _index(samples)] == list(range(10))


class _RecordingModel:
  """Stands in for the denoiser (with the real class conditioner): records what the loss feeds it and answers a
  fixed function of x_t."""
  vae = None

  def __init__(self):
    self.calls = []
    self.conditioners = {"class": ClassConditioner(10)}

  def condition(self, batch, drop=None):
    return DiffusionModel.condition(self, batch, drop)  # the real per-conditioner dispatch of the drops

  def __call__(self, x_t, t, cond):
    self.calls.append(dict(x_t=np.asarray(x_t), t=np.asarray(t), labels=np.asarray(cond["class_labels"])))
    return 0.5 * x_t


def _batch(n=64, size=16):
  rng = np.random.default_rng(0)
  return {"image": jnp.asarray(rng.uniform(-1, 1, (n, size, size, 1)), jnp.float32),
          "tokens": jnp.zeros((n, 16), jnp.int32), "label": jnp.asarray(np.arange(n) % 10, jnp.int32),
          "valid": jnp.ones((n,), jnp.float32)}


def test_flow_loss_is_the_velocity_error_on_the_straight_path():
  config = get_config("flow,tiny")
  config.diffusion.cond_drop_prob = 0.0
  task = get_task(config)
  model, batch = _RecordingModel(), _batch()
  loss, metrics = task.loss(model, batch, jax.random.key(3))
  (call,) = model.calls
  x0 = np.asarray(batch["image"])
  sigma = call["t"] / config.diffusion.num_timesteps  # the model sees t in [0, 1000)
  assert call["t"].dtype == np.float32 and np.all((sigma > 0) & (sigma < 1)) and np.std(sigma) > 0.05
  s = sigma[:, None, None, None]
  # x_t = (1 - s) x0 + s noise: recover the noise the loss drew, and check that it is a standard normal draw.
  noise = (call["x_t"] - (1 - s) * x0) / s
  assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05
  expected = np.mean(np.square(0.5 * call["x_t"] - (noise - x0)))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
  np.testing.assert_array_equal(call["labels"], np.asarray(batch["label"]))


def test_dropped_labels_become_the_null_class_and_ddpm_objective_uses_integer_steps():
  config = get_config("tiny")
  config.diffusion.cond_drop_prob = 1.0
  model = _RecordingModel()
  get_task(config).loss(model, _batch(), jax.random.key(0))
  (call,) = model.calls
  np.testing.assert_array_equal(call["labels"], np.full(64, config.model.num_classes))
  assert call["t"].dtype == np.int32 and call["t"].max() >= 500  # t ~ U{0..999}, not a flow time in [0, 1]


def test_class_conditional_dit_has_no_text_tower():
  task = get_task(get_config("tiny"))
  model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
  assert list(model.conditioners) == ["class"] and model.vae is None
  dit = model.denoiser.dit.config
  assert dit.num_classes == 10 and dit.context_dim == 0
  assert dit.output_channels == 1  # no learned variance: the objective predicts only the mean


@pytest.mark.parametrize("arg, key, value, message", [
    ("flow,tiny", "sample.sampler", "ddim", "flow_euler"),
    ("flow,tiny", "flow.time_sampling", "beta", "flow.time_sampling"),
    ("tiny", "model.denoiser", "mlp", "model.denoiser"),
    ("tiny", "diffusion.objective", "score", "diffusion.objective"),
])
def test_bad_choices_are_config_errors(arg, key, value, message):
  config = get_config(arg)
  section, field = key.split(".")
  config[section][field] = value
  with pytest.raises(ConfigError, match=message):
    get_task(config).weight_sources()[-1].config()


def test_reflow_trains_on_the_teachers_pairs_from_its_weights_and_resumes_without_it(flow_runs, tmp_path):
  import shutil
  from diffusion_jax.tasks import reflow
  from diffusion_jax.train.parts import flat_names
  from diffusion_jax.train.trainer import Trainer
  teacher_wd, wd = str(tmp_path / "teacher"), str(tmp_path / "reflow")
  shutil.copytree(flow_runs[8], teacher_wd)  # a finished flow run (this test deletes its copy)
  teacher_trainer = Trainer(get_config("flow,tiny"), teacher_wd)
  teacher_state = teacher_trainer.load_for_inference()
  teacher = teacher_trainer.model_context(teacher_state)

  config = get_config("reflow,tiny")
  config.flow.reflow.teacher_workdir = teacher_wd
  config.train.steps = 2
  trainer = Trainer(config, wd)
  ckpt = trainer.checkpointer()
  start, _ = trainer.restore_or_init(ckpt)  # the reflowed model starts from the teacher's (EMA) weights
  ckpt.close()
  want = flat_names(teacher_state.ema["main"])
  got = flat_names(start.params["main"])
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]))
  trainer.train()

  path = os.path.join(wd, reflow.PAIRS_FILE)
  with np.load(path, allow_pickle=False) as f:
    noise, image, labels = f["noise"], f["image"], f["label"]
  assert image.shape == noise.shape == (16, 16, 16, 1)
  np.testing.assert_array_equal(labels, np.arange(16) % 10)
  assert np.all(np.abs(image) <= 1) and np.std(image) > 0
  # The pairs are the teacher's guided samples from exactly that noise.
  task = trainer.task
  fn = teacher.jit(task._pairs_fn(10))
  inputs = task.prompt_inputs([""] * 10, labels[:10])
  with jax.set_mesh(teacher.mesh):
    redo_noise, redo_image = fn(inputs, task.prompt_inputs([""]), jax.random.fold_in(jax.random.key(0), 0))
  np.testing.assert_allclose(np.asarray(redo_noise), noise[:10], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(redo_image), image[:10], atol=1e-5)

  shutil.rmtree(teacher_wd)  # a resumed run reads its pairs back and never needs the teacher again
  config.train.steps = 4
  Trainer(config, wd).train()
  assert [r["step"] for r in read_metrics(wd) if "train/loss" in r] == [2, 4]


def test_reflow_loss_uses_each_pairs_noise():
  config = get_config("flow,tiny")
  config.diffusion.cond_drop_prob = 0.0
  batch = _batch()
  batch["noise"] = jnp.asarray(np.random.default_rng(1).normal(size=batch["image"].shape), jnp.float32)
  model = _RecordingModel()
  get_task(config).loss(model, batch, jax.random.key(3))
  (call,) = model.calls
  s = (call["t"] / config.diffusion.num_timesteps)[:, None, None, None]
  np.testing.assert_allclose(call["x_t"], (1 - s) * np.asarray(batch["image"]) + s * np.asarray(batch["noise"]),
                             atol=1e-6)


@pytest.mark.parametrize("arg, teacher, message", [
    ("flow,tiny", "/tmp", "task='reflow'"),
    ("reflow,tiny", "/nonexistent/teacher", "holds no checkpoints"),
    ("reflow,tiny", "", "needs flow.reflow.teacher_workdir"),
])
def test_reflow_errors(arg, teacher, message):
  config = get_config(arg)
  config.flow.reflow.teacher_workdir = teacher
  with pytest.raises(ConfigError, match=message):
    get_task(config).weight_sources()[-1].config()
