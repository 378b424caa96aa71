"""GANs on the trainer (tasks/gan.py): the penalties, spectral norm, matching-aware negatives, projection head, weight
clipping and n_critic as the papers define them; a tiny run through the CLI (train, then --mode sample) that resumes
and runs on 8 devices with the losses of the one-device run."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs.mnist_clip import get_config as clip_config
from configs.mnist_gan import get_config
from diffusion_jax.config import ConfigError
from diffusion_jax.gan import losses
from diffusion_jax.models import layers
from diffusion_jax.models.gan import GAN, GANConfig, GeneratorNorm
from diffusion_jax.models.spectral_norm import SpectralNorm, kernel_matrix
from diffusion_jax.tasks.gan import GANTask
from diffusion_jax.train import optimizer, parts
from diffusion_jax.train.metrics_writer import read_metrics
from diffusion_jax.train.trainer import Trainer
from tests.runs import saved_run
from tests.test_cli import run_cli


def _rows(workdir, key):
  return {r["step"]: r[key] for r in read_metrics(workdir) if key in r}


def _arrays(tree):
  return {k: np.asarray(v) for k, v in parts.flat_names(tree).items()}


def _opt_count(opt_state) -> int:
  leaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
  return max(int(x) for p, x in leaves if "count" in jax.tree_util.keystr(p))


# ---------------------------------------------------------------------------------------------------- losses
def test_gradient_penalty_and_r1_equal_their_closed_forms():
  rng = np.random.default_rng(0)
  real, fake = (rng.standard_normal((5, 3, 3, 2)).astype(np.float32) for _ in range(2))
  eps = rng.uniform(size=5).astype(np.float32)
  weights = np.array([1, 1, 1, 0, 1], np.float32)
  # A linear critic ⟨w, x⟩ has gradient w everywhere.
  w = rng.standard_normal((3, 3, 2)).astype(np.float32)
  linear = lambda x: jnp.sum(x * w, axis=(1, 2, 3))
  gp = losses.gradient_penalty(linear, real, fake, eps, weights)
  np.testing.assert_allclose(gp, (np.linalg.norm(w) - 1.0) ** 2, rtol=1e-5)
  # A quadratic critic Σ a·x² has gradient 2a·x, at the interpolate x̂ = eps·real + (1 - eps)·fake.
  a = rng.uniform(0.1, 1.0, (3, 3, 2)).astype(np.float32)
  quadratic = lambda x: jnp.sum(a * x * x, axis=(1, 2, 3))
  e = eps[:, None, None, None]
  norms = np.linalg.norm((2 * a * (e * real + (1 - e) * fake)).reshape(5, -1), axis=1)
  expected = np.sum(weights * (norms - 1.0) ** 2) / weights.sum()
  np.testing.assert_allclose(losses.gradient_penalty(quadratic, real, fake, eps, weights), expected, rtol=1e-5)
  r1 = np.sum(weights * np.sum((2 * a * real).reshape(5, -1) ** 2, axis=1)) / weights.sum()
  np.testing.assert_allclose(losses.r1_penalty(quadratic, real, weights), r1, rtol=1e-5)


def test_losses_are_the_papers():
  logits, ones = jnp.array([-2.0, 0.5, 3.0]), jnp.ones(3)
  sig = jax.nn.sigmoid(logits)
  np.testing.assert_allclose(losses.real_term("minimax", logits, ones), -np.mean(np.log(sig)), rtol=1e-5)
  np.testing.assert_allclose(losses.fake_term("non_saturating", logits, ones), -np.mean(np.log(1 - sig)), rtol=1e-5)
  np.testing.assert_allclose(losses.generator_loss("minimax", logits, ones), np.mean(np.log(1 - sig)), rtol=1e-5)
  np.testing.assert_allclose(losses.generator_loss("non_saturating", logits, ones), -np.mean(np.log(sig)), rtol=1e-5)
  np.testing.assert_allclose(losses.real_term("hinge", logits, ones), np.mean(np.maximum(0, 1 - logits)))
  np.testing.assert_allclose(losses.fake_term("hinge", logits, ones), np.mean(np.maximum(0, 1 + logits)))
  assert losses.real_term("wgan", logits, ones) == -losses.fake_term("wgan_gp", logits, ones)


def test_matching_aware_negatives_pair_each_image_with_another_digits_caption():
  labels = jnp.array([3, 3, 7, 1, 3, 7, 7, 0], jnp.int32)
  valid = jnp.array([1, 1, 1, 1, 1, 1, 1, 0], jnp.float32)
  for seed in range(5):
    rows, found = losses.mismatched_rows(labels, valid, jax.random.key(seed))
    rows, found = np.asarray(rows), np.asarray(found)
    assert np.all(found == 1)
    assert np.all(np.asarray(labels)[rows] != np.asarray(labels)), rows  # really mismatched
    assert np.all(np.asarray(valid)[rows] == 1)  # never the padding row
  # A batch of one digit has no mismatched caption: those negatives weigh nothing.
  _, found = losses.mismatched_rows(jnp.full((4,), 5), jnp.ones(4), jax.random.key(0))
  assert np.all(np.asarray(found) == 0)


# ---------------------------------------------------------------------------------------------------- models
def test_spectral_norm_power_iteration_converges_to_the_top_singular_value():
  rngs = nnx.Rngs(0)
  conv = layers.conv(3, 5, 3, rngs=rngs)
  conv.kernel[...] = jax.random.normal(jax.random.key(1), conv.kernel.shape)
  sn = SpectralNorm(conv, rngs=rngs)
  x = jax.random.normal(jax.random.key(2), (2, 6, 6, 3))
  top = np.linalg.svd(np.asarray(kernel_matrix(conv.kernel[...])), compute_uv=False)[0]
  assert abs(float(sn.sigma(update=False)) - top) > 1e-2 * top  # a random u is not converged yet
  u0 = np.asarray(sn.u[...])
  sn(x)
  assert not np.allclose(np.asarray(sn.u[...]), u0)  # one iteration per training call, stored
  for _ in range(40):
    y = sn(x)
  np.testing.assert_allclose(float(sn.sigma(update=False)), top, rtol=1e-4)
  # The layer is the convolution with kernel / σ.
  ref = jax.lax.conv_general_dilated(x, conv.kernel[...] / sn.sigma(update=False), (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv.bias[...]
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
  # Evaluation mode uses the stored u without advancing it.
  sn.eval()
  u = np.asarray(sn.u[...])
  sn(x)
  np.testing.assert_array_equal(np.asarray(sn.u[...]), u)


@pytest.mark.parametrize("architecture", ["dcgan", "resnet"])
def test_projection_discriminator_adds_the_label_embedding_dot_the_features(architecture):
  cfg = GANConfig(architecture=architecture, image_size=16, g_channels=(8, 8), d_channels=(8, 8, 8), z_dim=4,
                  cond_dim=4, spectral_norm=architecture == "resnet", d_hidden=16)
  model = GAN(cfg, rngs=nnx.Rngs(0))
  model.eval()
  d = model.discriminator
  x = jax.random.normal(jax.random.key(0), (3, 16, 16, 1))
  labels = jnp.array([0, 4, 9])
  logits = d(x, labels)
  assert logits.shape == (3,)
  f = d.features(x)
  if architecture == "dcgan":  # flattened, then InfoGAN's dense layer
    h = jax.nn.leaky_relu(d.head.hidden(f.reshape(3, -1)), 0.2)
  else:  # SNGAN's sum over positions
    h = jnp.sum(jax.nn.relu(f), axis=(1, 2))
  embed = d.head.project(labels)  # the class table's rows (spectrally normalised for the ResNet)
  assert embed.shape == h.shape
  np.testing.assert_allclose(logits, d.head.psi(h)[:, 0] + jnp.sum(embed * h, axis=1), rtol=1e-5, atol=1e-5)
  # The label moves the logit through the projection alone.
  other = d(x, (labels + 1) % 10)
  np.testing.assert_allclose(other - logits, jnp.sum((d.head.project((labels + 1) % 10) - embed) * h, axis=1),
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="without a condition"):
    d(x)
  if architecture == "resnet":
    return
  # Concatenation conditioning and the unconditional head.
  concat = GAN(GANConfig(**{**cfg.__dict__, "conditioning": "concat"}), rngs=nnx.Rngs(0)).discriminator
  assert concat(x, labels).shape == (3,) and not np.allclose(concat(x, labels), concat(x, (labels + 1) % 10))
  plain = GAN(GANConfig(**{**cfg.__dict__, "cond": "none"}), rngs=nnx.Rngs(0))
  assert plain.discriminator(x).shape == (3,) and plain.generator(jnp.ones((3, 4))).shape == (3, 16, 16, 1)


def test_conditional_batch_norm_scales_and_shifts_the_normalised_features_by_the_condition():
  cfg = GANConfig(image_size=16, g_channels=(8, 8), d_channels=(8, 8), z_dim=4, cond_dim=4)
  norm = GeneratorNorm(cfg, 6, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (5, 3, 3, 6)) * 3 + 1
  c = jax.random.normal(jax.random.key(1), (5, 4))
  mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
  gain, shift = c @ norm.gain.kernel[...] + norm.gain.bias[...], c @ norm.shift.kernel[...] + norm.shift.bias[...]
  expected = (x - mean) / jnp.sqrt(var + 1e-5) * (1 + gain[:, None, None]) + shift[:, None, None]
  np.testing.assert_allclose(norm(x, c), expected, rtol=1e-4, atol=1e-4)
  # The generator's first layer then sees z alone; with g_conditioning='concat' z and the class embedding.
  assert GAN(cfg, rngs=nnx.Rngs(0)).generator.fc.kernel.shape[0] == 4
  concat = GANConfig(**{**cfg.__dict__, "g_conditioning": "concat"})
  assert GeneratorNorm(concat, 6, rngs=nnx.Rngs(0)).gain is None


def test_weight_clipping_projects_every_parameter_into_the_box():
  section = get_config("wgan").disc_optim
  tx, _ = optimizer.make_optimizer(section, 10)
  params = {"w": jnp.array([0.5, -0.3, 0.004, -0.009]), "b": jnp.array([[0.02]])}
  state = tx.init(params)
  grads = {"w": jnp.array([1.0, -1.0, 1e-4, 0.0]), "b": jnp.array([[-3.0]])}
  updates, _ = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  c = section.clip_weights
  assert c == 0.01
  for leaf in jax.tree.leaves(new):
    assert np.all(np.abs(np.asarray(leaf)) <= c * (1 + 1e-6))
  assert float(new["w"][0]) == pytest.approx(c) and float(new["w"][1]) == pytest.approx(-c)
  assert abs(float(new["w"][2])) < c  # inside the box, an ordinary step


@pytest.mark.parametrize("overrides, message", [
    ({"gan.loss": "wgan", "disc_optim.clip_weights": 0.0}, "set disc_optim.clip_weights"),
    ({"gan.loss": "wgan_gp", "model.d_batch_norm": True}, "model.d_batch_norm=False"),
    ({"gan.matching_aware": True}, "needs gan.condition='text'"),
    ({"gan.loss": "lsgan"}, "gan.loss must be one of"),
    ({"gan.condition": "text"}, "text.clip_workdir is empty"),
    ({"model.g_channels": (8, 8, 8)}, "model: image_size=28 is not a multiple"),
    ({"sample.prompts": ("seven",)}, "they need gan.condition='text'"),
    ({"sample.classes": (3, 10)}, r"class ids in \[0, 10\), got \[10\]"),
    ({"gan.condition": "none", "sample.classes": (3,)}, "they need gan.condition='class'"),
])
def test_bad_gan_settings_are_one_line_config_errors(overrides, message):
  c = get_config()
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  with pytest.raises(ConfigError, match=message):
    GANTask(c)


# ---------------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """configs/mnist_gan.py:tiny trained through the CLI on one device, then sampled with --mode sample."""
  workdir = str(tmp_path_factory.mktemp("gan_cli"))
  train = run_cli("--config", "configs/mnist_gan.py:tiny", "--workdir", workdir)
  assert train.returncode == 0, train.stderr[-3000:]
  sample = run_cli("--config", "configs/mnist_gan.py:tiny", "--workdir", workdir, "--mode", "sample")
  assert sample.returncode == 0, sample.stderr[-3000:]
  return workdir


def test_cli_trains_both_players_and_samples_a_grid_per_class(cli_run):
  rows = read_metrics(cli_run)
  assert [r["step"] for r in rows if "train/generator/loss" in r] == [2, 4]
  for key in ("train/discriminator/loss", "train/discriminator/real_logit", "train/generator/loss"):
    assert np.isfinite(rows[-1][key]), key
  out = os.path.join(cli_run, "samples", "step_4")
  assert os.path.exists(os.path.join(out, "grid.png"))
  index = [json.loads(line) for line in open(os.path.join(out, "index.jsonl"))]
  assert [r["label"] for r in index] == list(range(10))  # sample.per_prompt=1 of every digit
  assert index[7]["prompt"] == "a handwritten digit seven"


def test_resumed_run_on_eight_devices_has_the_losses_of_the_one_device_run(cli_run, tmp_path):
  """Stopped at step 2 on 8 devices (data parallel), resumed: the CLI run's losses, parameters, generator EMA and
  batch statistics. BatchNorm's statistics are over the global batch wherever its rows live."""
  assert jax.device_count() == 8
  config = _config("tiny", **{"mesh.shape": (8, 1, 1)})
  Trainer(config, str(tmp_path)).train(stop_at=2)
  state = Trainer(config, str(tmp_path)).train()
  for key in ("train/discriminator/loss", "train/generator/loss"):
    ref, got = _rows(cli_run, key), _rows(str(tmp_path), key)
    np.testing.assert_allclose([got[s] for s in (2, 4)], [ref[s] for s in (2, 4)], rtol=2e-5)
  ref = Trainer(_config("tiny", **{"mesh.shape": (1, 1, 1)}), cli_run).load_for_inference()
  for tree in ("params", "ema", "mutable"):
    a, b = _arrays(getattr(state, tree)), _arrays(getattr(ref, tree))
    assert a.keys() == b.keys() and a
    for k in b:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=f"{tree}.{k}")


def _config(arg, **overrides):
  c = get_config(arg)
  for key, value in overrides.items():
    *path, field = key.split(".")
    node = c
    for p in path:
      node = node[p]
    node[field] = value
  return c


def test_wgan_steps_the_critic_n_critic_times_and_keeps_its_weights_clipped(tmp_path):
  config = _config("wgan,tiny", **{"mesh.shape": (1, 1, 1)})
  trainer = Trainer(config, str(tmp_path))
  state = trainer.train()
  assert config.gan.n_critic == 5 and config.train.steps == 4
  assert _opt_count(state.opt_state["discriminator"]) == 20 and _opt_count(state.opt_state["generator"]) == 4
  assert list(state.ema) == ["generator"]
  row = read_metrics(str(tmp_path))[-1]
  assert row["train/discriminator/count/skipped_examples"] == 0 and np.isfinite(row["train/discriminator/wasserstein"])
  c = config.disc_optim.clip_weights
  critic = _arrays(state.params["discriminator"])
  assert max(np.abs(v).max() for v in critic.values()) <= c * (1 + 1e-6)
  assert max(np.abs(v).max() for v in critic.values()) == pytest.approx(c)  # the box binds
  # Generation is one program per chunk size, its images independent of the chunking, in [-1, 1].
  task, ctx = trainer.task, trainer.model_context(state)
  prompts, labels = task.label_prompts(2, "")
  images = task.generate(ctx, prompts, 3, labels=labels)
  assert images.shape == (20, 16, 16, 1) and np.abs(images).max() <= 1.0
  task.config.unlock()
  task.config.sample.batch_size = 7
  np.testing.assert_allclose(task.generate(ctx, prompts, 3, labels=labels), images, rtol=1e-5, atol=1e-6)
  # Chosen digits only (sample.classes), per_prompt of each.
  task.config.sample.update(classes=(3, 7), per_prompt=2)
  info = task.sample(ctx, str(tmp_path / "classes"))
  assert [(r["label"], r["prompt"]) for r in map(json.loads, open(info["index"]))] == [
      (3, "a handwritten digit three")] * 2 + [(7, "a handwritten digit seven")] * 2
  task.config.sample.classes = ()
  # Interpolation strips: per_prompt images along the slerp between two latents, one digit per strip.
  task.config.sample.update(interpolate=2, per_prompt=3, truncation=0.7)
  info = task.sample(ctx, str(tmp_path / "strips"))
  index = [json.loads(line) for line in open(info["index"])]
  assert [(r["strip"], r["weight"], r["label"]) for r in index] == [
      (k, w, k) for k in (0, 1) for w in (0.0, 0.5, 1.0)]
  assert all(r["truncation"] == 0.7 for r in index)
  z = np.asarray(task.latents(jax.random.key(0), 1000, 0.5))
  assert np.abs(z).max() <= 0.5 and np.mean(np.abs(z) > 0.49) < 0.03  # values beyond t redrawn, not clipped to ±t


def test_text_gan_trains_on_a_clip_runs_frozen_text_tower_and_samples_given_captions(tmp_path):
  """configs/mnist_gan.py:text,tiny on a finished (tiny, random) CLIP run: both players train, the discriminator
  scores mismatched captions, the CLIP run's text tower stays as restored, and sample.prompts draws per caption."""
  clip = saved_run(clip_config("tiny"), str(tmp_path / "clip"))
  tower = _arrays(clip.load_for_inference().params)
  config = _config("text,tiny", **{"mesh.shape": (1, 1, 1), "text.clip_workdir": clip.workdir})
  trainer = Trainer(config, str(tmp_path / "gan"))
  state = trainer.train()
  row = read_metrics(str(tmp_path / "gan"))[-1]
  for key in ("train/discriminator/loss", "train/discriminator/mismatched_logit", "train/generator/loss"):
    assert np.isfinite(row[key]), key
  frozen = _arrays(trainer.frozen)
  assert len(frozen) > 10 and not any(k.startswith("text") for k in _arrays(state.params))
  for name, value in frozen.items():
    np.testing.assert_array_equal(value, tower[name.replace("text.tower.", "main.")], err_msg=name)
  task, ctx = trainer.task, trainer.model_context(state)
  task.config.unlock()
  task.config.sample.update(prompts=("a handwritten digit seven", "two"), per_prompt=2)
  info = task.sample(ctx, str(tmp_path / "samples"))
  index = [json.loads(line) for line in open(info["index"])]
  assert [r["prompt"] for r in index] == ["a handwritten digit seven"] * 2 + ["two"] * 2
  images = task.generate(ctx, ["seven", "two"], 0)
  assert images.shape == (2, 16, 16, 1) and not np.allclose(images[0], images[1])  # the caption matters
