"""The VAE task ('vae', configs/mnist_cvae.py): the ELBO against hand computation, the KL and the discretized Gaussian
against independent references, the importance-weighted bound against the ELBO on a trained tiny model, prior
sampling, the denoising option, and a CLI train + `--mode sample` run."""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from configs.mnist_cvae import get_config
from diffusion_jax.config import ConfigError, one_line
from diffusion_jax.data import pipeline
from diffusion_jax.models import likelihoods
from diffusion_jax.models.vae import DiagonalGaussian
from diffusion_jax.train.task import get_task
from diffusion_jax.train.trainer import Trainer
from tests.conftest import FAST_COMPILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16  # the tiny config's image size
D = SIZE * SIZE


def _config(arg="tiny", **vae):
  c = get_config(arg)
  c.vae.update(**vae)
  return c


def _known_model(task, mean, logvar, decoder_bias):
  """A model whose encoder says N(mean, e^logvar) and whose decoder outputs `decoder_bias` for every image: every
  kernel zero, the output layers' biases set."""
  model = task.build_model(nnx.Rngs(0))
  for _, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      var[...] = jnp.zeros_like(var[...])
  model.encoder.moments.bias[...] = jnp.concatenate([jnp.full(task.model_config.latent_dim, mean),
                                                     jnp.full(task.model_config.latent_dim, logvar)])
  model.decoder.project.bias[...] = jnp.full(model.decoder.project.bias[...].shape, decoder_bias)
  return model


def _binary_images(n, seed=0):
  """Images already binary (pixels -1 or 1), so the Bernoulli model's binarization leaves them as they are."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.where(rng.random((n, SIZE, SIZE, 1)) < 0.3, 1.0, -1.0), jnp.float32)


def _cli(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}")
  return subprocess.run([sys.executable, "-m", "diffusion_jax.main", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------------- formulas
@pytest.mark.parametrize("mean, logvar, bias", [(0.0, 0.0, 0.0), (0.7, -1.2, 1.3)])
def test_elbo_and_loss_equal_the_hand_computed_value_of_known_weights(mean, logvar, bias):
  c = _config(conditional=False, beta=2.0)
  c.model.update(conv_widths=(), hidden=())  # an encoder and a decoder of one dense layer each
  task = get_task(c)
  model = _known_model(task, mean, logvar, bias)
  x = _binary_images(3)
  ones = np.asarray((x + 1) / 2).reshape(3, -1).sum(1)
  log_sig = lambda v: -math.log1p(math.exp(-v))
  rec = -(ones * log_sig(bias) + (D - ones) * log_sig(-bias))  # logits `bias` at every pixel, whatever z is
  kl = 0.5 * task.model_config.latent_dim * (mean ** 2 + math.exp(logvar) - 1 - logvar)
  got = task.bounds(model, {"image": x, "label": jnp.zeros(3, jnp.int32)}, jnp.arange(3), 0, 8)
  np.testing.assert_allclose(got["reconstruction"], rec, rtol=1e-5)
  np.testing.assert_allclose(got["kl"], kl, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["neg_elbo"], rec + kl, rtol=1e-5)
  if mean == 0.0 and logvar == 0.0:  # q = p: every importance weight is p(x|z), so the bound is exact
    np.testing.assert_allclose(got["iwae_nll"], D * math.log(2.0), rtol=1e-6)
  loss, metrics = task.loss(model, {"image": x, "label": jnp.zeros(3, jnp.int32), "valid": jnp.ones(3)},
                            jax.random.key(0))
  np.testing.assert_allclose(loss, np.mean(rec + 2.0 * kl) / D, rtol=1e-5)  # β = 2 weighs the KL, per dimension
  np.testing.assert_allclose(metrics["neg_elbo"], np.mean(rec + kl), rtol=1e-5)
  np.testing.assert_allclose(metrics["bits_per_dim"], np.mean(rec + kl) / (D * math.log(2)), rtol=1e-5)


def test_the_kl_formula_matches_a_monte_carlo_estimate():
  rng = np.random.default_rng(0)
  q = DiagonalGaussian(jnp.asarray(rng.normal(size=(4, 6)), jnp.float32),
                       jnp.asarray(rng.normal(scale=0.7, size=(4, 6)), jnp.float32))
  z = q.mean + q.std * jax.random.normal(jax.random.key(1), (200_000, 4, 6))
  samples = q.log_prob(z) - likelihoods.standard_normal_log_prob(z)  # log q(z) - log p(z), z ~ q
  mc, se = np.mean(samples, axis=0), np.std(samples, axis=0) / math.sqrt(len(z))
  assert np.all(np.abs(mc - np.asarray(q.kl())) < 4 * se + 1e-4), (mc, q.kl())
  reference = stats.norm(np.asarray(q.mean), np.asarray(q.std)).logpdf(np.asarray(z[:3])).sum(-1)
  np.testing.assert_allclose(q.log_prob(z[:3]), reference, rtol=1e-5)


def test_discretized_gaussian_is_a_distribution_over_the_8bit_levels_and_matches_scipy():
  levels = np.arange(256) / 127.5 - 1.0
  for mean, sigma in ((0.1, 0.3), (-0.97, 0.002), (5.0, 0.01), (-1.0, 1e-4)):  # the last two: far tails
    logp = likelihoods.discretized_gaussian_log_prob(jnp.asarray(levels, jnp.float32), jnp.full(256, mean),
                                                     jnp.full(256, math.log(sigma)), event_dims=0)
    assert np.all(np.isfinite(logp))
    assert float(jax.nn.logsumexp(logp)) == pytest.approx(0.0, abs=1e-4)  # the 256 probabilities sum to 1
    dist = stats.norm(mean, sigma)
    edges = np.concatenate([[-np.inf], (levels[:-1] + levels[1:]) / 2, [np.inf]])
    with np.errstate(divide="ignore"):
      # Mass of each bin, from the side of the mean where neither CDF value rounds to 1.
      ref = np.log(np.where(edges[1:] <= mean, dist.cdf(edges[1:]) - dist.cdf(edges[:-1]),
                            dist.sf(edges[:-1]) - dist.sf(edges[1:])))
    ok = ref > -80  # float64 scipy underflows where our log-space tails keep going
    np.testing.assert_allclose(np.asarray(logp)[ok], ref[ok], rtol=2e-4, atol=2e-4)
  grads = jax.grad(lambda m: likelihoods.discretized_gaussian_log_prob(
      jnp.asarray(levels, jnp.float32), m, jnp.full(256, -6.0), event_dims=0).sum())(jnp.full(256, 0.3))
  assert np.all(np.isfinite(grads))


# ---------------------------------------------------------------------------------------------------- a trained run
RUN = {"train.steps": 30, "train.log_every": 10, "train.checkpoint_every": 30, "optim.lr": 0.01,
       "optim.warmup_steps": 3, "ema.enabled": False, "train.sample_at_end": False}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny conditional VAE trained by the command line (30 steps at a high learning rate, so q(z|x) is no longer the
  prior), then loaded here: (workdir, trainer, model context)."""
  wd = str(tmp_path_factory.mktemp("cvae") / "run")
  proc = _cli("--config", "configs/mnist_cvae.py:tiny", "--workdir", wd, *(f"--config.{k}={v}" for k, v in RUN.items()))
  assert proc.returncode == 0, proc.stderr[-3000:]
  c = get_config("tiny")
  for key, value in RUN.items():
    section, field = key.split(".")
    c[section][field] = value
  trainer = Trainer(c, wd)
  state = trainer.load_for_inference()
  return wd, trainer, trainer.model_context(state)


def test_the_evaluator_reports_nats_and_bits_per_dim(run):
  wd, *_ = run
  rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
  (ev,) = [r for r in rows if "eval/iwae_nll" in r]
  assert ev["step"] == 30 and ev["eval/elbo_examples"] == 32
  for key in ("neg_elbo", "iwae"):
    nats = ev[f"eval/{key}_nll" if key == "iwae" else f"eval/{key}"]
    assert ev[f"eval/{key}_bits_per_dim"] == pytest.approx(nats / (D * math.log(2)), rel=1e-6)
  assert ev["eval/neg_elbo"] == pytest.approx(ev["eval/reconstruction_nats"] + ev["eval/kl_nats"], rel=1e-6)
  assert 0 < ev["eval/iwae_nll"] <= ev["eval/neg_elbo"] < D * math.log(2)  # it learned something
  assert ev["eval/kl_nats"] > 0.5  # ... about the images: the posterior is not the prior


def test_importance_weighted_bound_is_the_elbo_at_k1_and_tighter_with_more_samples(run):
  _, trainer, ctx = run
  task = trainer.task
  data = pipeline.make_dataset(trainer.config.data, "test", global_batch_size=64, seed=0, shuffle=False,
                               repeat=False)
  batch = {k: jnp.asarray(v) for k, v in next(iter(data)).items() if k in ("image", "label")}
  index = np.arange(64)
  bounds = {k: ctx.jit(lambda model, batch, index, seed, k=k: task.bounds(model, batch, index, seed, k),
                       key=("bounds", k)) for k in (1, 50)}
  # K = 1: log w = log p(x|z) + log p(z) - log q(z|x) has mean -KL + E log p(x|z), the ELBO; the estimate draws the
  # same z (and, by seed, the same binarization) as the ELBO's reconstruction term, so compare their difference.
  diff = np.stack([b["iwae_nll"] - b["neg_elbo"] for b in (bounds[1](batch, index, np.int32(s)) for s in range(40))])
  assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(diff.size), (diff.mean(), diff.std())
  assert diff.std() > 0.1  # a real check: single draws do differ from the ELBO
  k50 = bounds[50](batch, index, np.int32(0))
  gap = k50["neg_elbo"] - k50["iwae_nll"]
  assert gap.mean() > 0.05 and np.mean(gap > 0) > 0.9  # log-mean-exp of 50 weights ≥ their mean log


def test_conditional_generate_draws_the_requested_labels_deterministically_in_the_seed(run):
  _, trainer, ctx = run
  task = trainer.task
  prompts, labels = task.label_prompts(3)
  assert len(prompts) == 30 and labels.tolist() == [d for d in range(10) for _ in range(3)]
  assert prompts[3] == "a handwritten digit one"
  images = task.generate(ctx, prompts, seed=5, labels=labels)
  assert images.shape == (30, SIZE, SIZE, 1) and images.dtype == np.float32
  assert np.all(np.abs(images) <= 1)
  np.testing.assert_array_equal(images, task.generate(ctx, prompts, seed=5, labels=labels))
  assert not np.allclose(images, task.generate(ctx, prompts, seed=6, labels=labels))
  # The label steers the decoder: the same z with another digit is another image.
  seven = task.generate(ctx, prompts[:20], seed=5, labels=np.full(20, 7))
  assert not np.allclose(seven, images[:20])
  with pytest.raises(ValueError, match="a conditional VAE draws images of given labels"):
    task.generate(ctx, prompts, seed=5)
  with pytest.raises(ConfigError, match="without guidance"):
    task.generate(ctx, prompts, seed=5, labels=labels, guidance_scale=3.0)


def test_cli_sample_writes_the_prior_grid_and_reconstruction_pairs(run):
  wd, *_ = run
  proc = _cli("--config", "configs/mnist_cvae.py:tiny", "--workdir", wd, "--mode", "sample",
              *(f"--config.{k}={v}" for k, v in RUN.items()))
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = os.path.join(wd, "samples", "step_30")
  assert os.path.isfile(os.path.join(out, "grid.png"))
  index = [json.loads(line) for line in open(os.path.join(out, "index.jsonl"))]
  per_class, pairs = 2, 2
  assert [r["kind"] for r in index] == ["prior"] * 10 * per_class + ["original", "reconstruction"] * pairs
  assert [r["label"] for r in index[:4]] == [0, 0, 1, 1] and index[0]["prompt"] == "a handwritten digit zero"
  assert index[-1]["pair"] == pairs - 1 and index[-1]["label"] == index[-2]["label"]


# ---------------------------------------------------------------------------------------------------- options
def test_denoising_corrupts_only_what_the_encoder_sees():
  x = _binary_images(4)
  batch = {"image": x, "label": jnp.zeros(4, jnp.int32), "valid": jnp.ones(4)}

  def seen_and_scored(noise, likelihood):
    task = get_task(_config(input_noise=noise, likelihood=likelihood, binarize=likelihood == "bernoulli",
                            gaussian_std=0.1 if likelihood == "gaussian" else 0.0))
    model = task.build_model(nnx.Rngs(0))
    seen, scored = [], []
    encode, score = model.encode, task.log_likelihood
    model.encode = lambda images, labels: (seen.append(images), encode(images, labels))[1]
    task.log_likelihood = lambda m, target, out: (scored.append(target), score(m, target, out))[1]
    task.loss(model, batch, jax.random.key(0))
    return np.asarray(seen[0]), np.asarray(scored[0])

  for likelihood, clean_target in (("bernoulli", (x + 1) / 2), ("gaussian", x)):
    seen, scored = seen_and_scored(0.0, likelihood)
    np.testing.assert_array_equal(seen, x)
    np.testing.assert_array_equal(scored, clean_target)
    seen, scored = seen_and_scored(0.5, likelihood)
    assert np.std(seen - x) == pytest.approx(0.5, rel=0.05)  # the encoder's view is noisy ...
    np.testing.assert_array_equal(scored, clean_target)  # ... the likelihood is of the clean image


def test_evaluation_scores_binary_images_even_of_a_model_trained_on_soft_targets():
  task = get_task(_config(binarize=False))
  model = task.build_model(nnx.Rngs(0))
  scored, score = [], task.log_likelihood
  task.log_likelihood = lambda m, target, out: (scored.append(np.asarray(target)), score(m, target, out))[1]
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, SIZE, SIZE, 1)), jnp.float32)
  task.loss(model, {"image": x, "label": jnp.zeros(3, jnp.int32), "valid": jnp.ones(3)}, jax.random.key(0))
  np.testing.assert_allclose(scored.pop(), (x + 1) / 2, rtol=1e-6)  # training: grey levels as soft targets
  batch = {"image": jnp.repeat(x[:1], 3, axis=0), "label": jnp.zeros(3, jnp.int32)}
  task.bounds(model, batch, jnp.asarray([0, 1, 0]), 0, 1)
  binary = scored.pop()
  assert set(np.unique(binary)) == {0.0, 1.0}
  np.testing.assert_array_equal(binary[2], binary[0])  # drawn by (seed, index in the split), not by batch row
  assert not np.array_equal(binary[1], binary[0])


def test_gaussian_decoder_learns_one_sigma_or_keeps_the_fixed_one():
  learned = get_task(_config("gaussian,tiny"))
  assert learned.build_model(nnx.Rngs(0)).log_scale[...].shape == (1,)
  fixed = get_task(_config("gaussian,tiny", gaussian_std=0.2))
  model = fixed.build_model(nnx.Rngs(0))
  assert model.log_scale is None and float(fixed.log_scale(model)[0]) == pytest.approx(math.log(0.2))


@pytest.mark.parametrize("change, message", [
    (dict(likelihood="poisson"), "vae.likelihood must be one of ('bernoulli', 'gaussian'), got 'poisson'"),
    (dict(likelihood="gaussian"), "vae.binarize draws binary images for a Bernoulli decoder; a Gaussian decoder "
                                  "models the 8-bit pixels: set vae.binarize=False"),
    (dict(gaussian_std=0.1), "vae.gaussian_std is the Gaussian decoder's σ, but vae.likelihood='bernoulli'"),
    (dict(beta=-1.0), "vae.beta must be >= 0, got -1.0"),
])
def test_bad_options_are_one_line_config_errors(change, message):
  with pytest.raises(ConfigError) as e:
    get_task(_config(**change))
  assert one_line(e.value) == str(e.value) == message


def test_bad_model_shape_and_unknown_config_argument():
  c = _config()
  c.model.conv_widths = (4, 8, 8)
  c.data.image_size = 20
  with pytest.raises(ConfigError, match=r"model: the image size 20 is not a multiple of 2\^3 for 3 stride-2 conv"):
    get_task(c)
  with pytest.raises(ValueError, match="unknown config argument 'huge'"):
    get_config("tiny,huge")
