"""KL-VAE training as a task: SSIM/PSNR against scikit-image, the VAE and its PatchGAN discriminator as two updates
with two optimizers (each player's gradient is its own loss's), the adaptive weight against full autodiff, and a
tiny emoji run with eval and sample outputs."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.emoji_vae import get_config
from diffusion_jax.config import ConfigError
from diffusion_jax.eval import image_metrics
from diffusion_jax.train.task import get_task
from diffusion_jax.train.metrics_writer import read_metrics
from diffusion_jax.train.trainer import Trainer

skimage_metrics = pytest.importorskip("skimage.metrics")

SIZE = 16


def _config(**vae):
  c = get_config("tiny")
  c.data.image_size = SIZE
  c.vae.update(disc_weight=0.5, sample_posterior=False, **vae)
  return c


@pytest.fixture(scope="module")
def gan():
  """(task, merge, params by update, batch) of a tiny VAE + discriminator on a smooth random batch; `merge(params)`
  gives the model."""
  task = get_task(_config())
  trainer = Trainer(task.config, "/nonexistent", task=task)
  state = trainer.init_state()
  frozen = trainer.init_frozen()
  merge = lambda params: trainer.partition.merge(trainer.graphdef, frozen, params, state.mutable)
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
  base = np.stack([np.sin(5 * x + k) * np.cos(3 * y - k) for k in range(3)], -1)
  images = np.clip(base[None] * 0.8 + 0.1 * rng.standard_normal((4, SIZE, SIZE, 3)), -1, 1).astype(np.float32)
  batch = {"image": jnp.asarray(images), "valid": jnp.asarray([1.0, 1.0, 1.0, 0.0])}
  return task, merge, state.params, batch


@pytest.fixture(scope="module")
def task_grads(gan):
  """Each update's gradient of its own loss with respect to its own parameters, and the metrics."""
  task, merge, params, batch = gan

  def grads(params):
    vae = jax.grad(lambda p: task.vae_loss(merge(dict(params, vae=p)), batch, jax.random.key(0)), has_aux=True)
    disc = jax.grad(lambda p: task.discriminator_loss(merge(dict(params, discriminator=p)), batch,
                                                      jax.random.key(0)), has_aux=True)
    return vae(params["vae"]), disc(params["discriminator"])

  return jax.jit(grads)(params)


def test_ssim_and_psnr_match_scikit_image():
  rng = np.random.default_rng(1)
  y, x = np.mgrid[0:40, 0:48] / 40
  clean = np.stack([0.5 + 0.4 * np.sin(6 * x + k) * np.cos(4 * y) for k in range(3)], -1)
  a = np.stack([clean, clean[::-1], clean[:, ::-1]]).astype(np.float32)
  b = np.clip(a + rng.normal(0, [[[[0.02]]], [[[0.1]]], [[[0.3]]]], a.shape), 0, 1).astype(np.float32)
  ours_ssim, ours_psnr = np.asarray(image_metrics.ssim(a, b)), np.asarray(image_metrics.psnr(a, b))
  for i in range(3):
    ref = skimage_metrics.structural_similarity(a[i], b[i], data_range=1.0, channel_axis=-1, gaussian_weights=True,
                                                sigma=1.5, use_sample_covariance=False)
    assert ours_ssim[i] == pytest.approx(ref, abs=2e-5)
    assert ours_psnr[i] == pytest.approx(skimage_metrics.peak_signal_noise_ratio(a[i], b[i], data_range=1.0),
                                         abs=1e-3)
  assert ours_ssim[0] > ours_ssim[1] > ours_ssim[2]  # more noise, less similar
  assert np.asarray(image_metrics.ssim(a, a)) == pytest.approx(1.0, abs=1e-6)
  grey = image_metrics.ssim(a[..., :1] * 255, b[..., :1] * 255, data_range=255.0)  # range-invariant
  np.testing.assert_allclose(grey, image_metrics.ssim(a[..., :1], b[..., :1]), atol=1e-5)
  with pytest.raises(ValueError, match="11x11"):
    image_metrics.ssim(a[:, :8, :8], b[:, :8, :8])


def test_reference_photos_are_held_out_crops():
  photos = image_metrics.reference_photos(("astronaut", "coffee"), size=24, channels=3, crops=5)
  assert photos.shape == (10, 24, 24, 3) and photos.dtype == np.float32
  assert -1.0 <= photos.min() and photos.max() <= 1.0 and photos.std() > 0.2
  assert not np.allclose(photos[0], photos[1])  # the quadrants are other pictures than the whole view
  assert image_metrics.reference_photos(("chelsea",), size=16, channels=1, crops=1).shape == (1, 16, 16, 1)
  with pytest.raises(ValueError, match="no image 'eagle_owl'"):
    image_metrics.reference_photos(("eagle_owl",))


def _mean(x, valid):
  return jnp.sum(jnp.mean(x, axis=(1, 2, 3)) * valid) / jnp.sum(valid)


def test_each_player_gets_its_own_loss_gradient_and_the_adaptive_weight(gan, task_grads):
  """Update 'vae' differentiates rec + KL + w·g_loss with respect to the VAE, update 'discriminator' the hinge loss
  with respect to D, with w = ‖∇_W rec_loss‖ / ‖∇_W g_loss‖ · disc_weight at the decoder's last kernel W: all
  against plain autodiff of separately written losses (one Jacobian, so one compile)."""
  task, merge, params, batch = gan
  (vae_grads, metrics), (disc_grads, disc_metrics) = task_grads
  valid, x = batch["valid"], batch["image"]
  weight = metrics["d_weight"]

  def references(p):
    model = merge(p)
    rec, posterior = model.vae(x)
    rec_loss = _mean(jnp.abs(x - rec), valid)
    kl = jnp.sum(posterior.kl() * valid) / jnp.sum(valid)
    g_loss = -_mean(model.discriminator(rec), valid)
    real = jnp.mean(model.discriminator(x), axis=(1, 2, 3))
    fake = jnp.mean(model.discriminator(rec), axis=(1, 2, 3))
    n = jnp.sum(valid)
    hinge = 0.5 * (jnp.sum(jax.nn.relu(1 - real) * valid) / n + jnp.sum(jax.nn.relu(1 + fake) * valid) / n)
    generator = rec_loss + task.config.vae.kl_weight * kl / (SIZE * SIZE * 3) + weight * g_loss
    return jnp.stack([hinge, generator, rec_loss, g_loss])

  jac = jax.jit(jax.jacrev(references))(params)
  assert metrics["disc_factor"] == 1.0 and 0 < float(weight)
  for row, part, got in ((0, "discriminator", disc_grads), (1, "vae", vae_grads)):
    flat_got, flat_want = jax.tree.leaves(got), jax.tree.leaves(jac[part])
    assert len(flat_got) == len(flat_want)
    for g, w in zip(flat_got, flat_want):
      np.testing.assert_allclose(g, np.asarray(w)[row], rtol=2e-4, atol=1e-6)
  kernel = np.asarray(jac["vae"]["vae"]["decoder"]["conv_out"]["kernel"][...])[2:]
  norms = np.sqrt(np.sum(np.square(kernel).reshape(2, -1), axis=1))
  expected = norms[0] / (norms[1] + 1e-4) * task.config.vae.disc_weight
  assert float(weight) == pytest.approx(float(expected), rel=1e-4)


def test_disc_start_switches_the_gan_on(gan):
  _, merge, params, batch = gan
  task = get_task(_config(disc_start=10))
  model = merge(params)
  off, m_off = task.vae_loss(model, dict(batch, step=jnp.asarray(9)), jax.random.key(0))
  on, m_on = task.vae_loss(model, dict(batch, step=jnp.asarray(10)), jax.random.key(0))
  assert (float(m_off["disc_factor"]), float(m_on["disc_factor"])) == (0.0, 1.0)
  plain = m_off["rec_loss"] + task.config.vae.kl_weight * m_off["kl"] / (SIZE * SIZE * 3)
  assert float(off) == pytest.approx(float(plain), rel=1e-6)
  assert float(on) == pytest.approx(float(plain + m_on["d_weight"] * m_on["g_loss"]), rel=1e-5)
  d_off, _ = task.discriminator_loss(model, dict(batch, step=jnp.asarray(9)), jax.random.key(0))
  d_on, d_metrics = task.discriminator_loss(model, dict(batch, step=jnp.asarray(10)), jax.random.key(0))
  assert float(d_off) == 0.0 and float(d_on) == pytest.approx(float(d_metrics["d_loss"]))
  with pytest.raises(ConfigError, match="disc_start=10 needs the training step"):
    task.vae_loss(model, batch, jax.random.key(0))


def test_config_errors():
  c = _config(lpips_path="/weights/vgg.safetensors")
  c.data.channels = 4
  with pytest.raises(ConfigError, match="perceptual loss compares grey or RGB images, but data.channels=4"):
    get_task(c)
  with pytest.raises(ConfigError, match="rec_loss"):
    get_task(_config(rec_loss="l3"))
  c = _config()
  c.data.image_size = 17
  with pytest.raises(ConfigError, match="multiple of the VAE's downsampling factor 2"):
    get_task(c)


def test_tiny_emoji_run_trains_both_players_evaluates_and_samples(tmp_path):
  c = get_config("tiny")
  c.vae.disc_weight = 0.5
  c.mesh.shape = (2, 1, 1)  # the eval gathers and photo chunks on a sharded batch
  wd = str(tmp_path / "run")
  trainer = Trainer(c, wd)
  initial = jax.device_get(trainer.init_state().params)
  state = trainer.train()
  for part in ("vae", "discriminator"):
    # Kernels, not biases: at the start the discriminator's output bias gets equal and opposite hinge pushes.
    leaves = zip(jax.tree_util.tree_leaves_with_path(initial[part]), jax.tree.leaves(state.params[part]))
    pairs = [(a, b) for (path, a), b in leaves if "kernel" in jax.tree_util.keystr(path)]
    assert pairs and all(not np.allclose(a, b) for a, b in pairs), part
  assert list(state.ema) == ["vae"]  # no EMA of the discriminator (ema.updates)
  count = lambda tree: max(int(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
                           if "count" in jax.tree_util.keystr(p))
  assert count(state.opt_state["vae"]) == count(state.opt_state["discriminator"]) == 2  # two optimizers, a step each
  rows = read_metrics(wd)
  assert [r["step"] for r in rows if "train/vae/loss" in r] == [1, 2]
  assert all(np.isfinite(r["train/discriminator/d_loss"]) for r in rows if "train/discriminator/d_loss" in r)
  (ev,) = [r for r in rows if "eval/psnr" in r]
  assert ev["eval/photos_examples"] == 4 and ev["eval/examples"] > 50  # ~10% of the emoji are held out
  for key in ("psnr", "photos_psnr"):
    assert 0 < ev[f"eval/{key}"] < 60
  for key in ("ssim", "photos_ssim"):
    assert -1 <= ev[f"eval/{key}"] <= 1
  out = os.path.join(wd, "samples", "step_2")
  with open(os.path.join(out, "index.jsonl")) as f:
    index = [json.loads(line) for line in f]
  assert len(index) == 2 * (4 + 2)  # 4 eval pairs, then the full view of each of the 2 photos
  assert [r["prompt"] for r in index[:2]] == ["original", "reconstruction"]
  assert [r["source"] for r in index[::2]] == ["eval"] * 4 + ["photo"] * 2
  assert index[0]["psnr"] == index[1]["psnr"]
  assert os.path.isfile(os.path.join(out, "grid.png"))


def test_rematerialised_two_update_step_trains_like_the_plain_one_and_the_gan_starts_at_disc_start(tmp_path):
  """Remat inside a step of two updates (VAE, then discriminator on the VAE's new reconstructions) changes memory,
  not results; and the trainer passes the step, so the GAN term starts at disc_start (one run of each policy)."""
  losses, params = {}, {}
  for policy in ("none", "full"):
    c = _config(disc_start=1)
    c.model.remat = policy
    c.train.update(steps=3, log_every=1, checkpoint_every=100, eval_at_end=False, sample_at_end=False)
    wd = str(tmp_path / policy)
    params[policy] = jax.device_get(Trainer(c, wd).train().params)
    rows = [r for r in read_metrics(wd) if "train/vae/loss" in r]
    losses[policy] = [(r["train/vae/loss"], r["train/discriminator/d_loss"]) for r in rows]
    assert [r["train/vae/disc_factor"] for r in rows] == [0.0, 1.0, 1.0]  # step 0 without the GAN term
  assert len(losses["full"]) == 3
  np.testing.assert_allclose(losses["full"], losses["none"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params["full"], params["none"])
