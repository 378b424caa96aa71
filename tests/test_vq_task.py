"""VQ-VAE training (`task='autoencoder'`, `vae.bottleneck='vq'`): the EMA codebook step and dead-code restarts
against the formulas, a tiny MNIST run whose codebook is carried and checkpointed as mutable state and reported by
the `codebook` evaluator, the learned-codebook variant, and the export of a trained tokenizer to diffusers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.mnist_vq import get_config
from diffusion_jax.config import ConfigError
from diffusion_jax.models.vq import CodebookState, VectorQuantizer, VQModel
from diffusion_jax.train.metrics_writer import read_metrics
from diffusion_jax.train.task import get_task
from diffusion_jax.train.trainer import Trainer


def test_ema_step_moves_each_code_to_the_smoothed_mean_of_its_assignments_and_restarts_dead_codes():
  q = VectorQuantizer(3, 2, rngs=nnx.Rngs(0), ema_decay=0.9, restart_threshold=0.05)
  start = np.asarray([[0., 0.], [10., 10.], [-50., 50.]], np.float32)
  q.embedding.embedding[...] = jnp.asarray(start)
  q.embed_sum[...] = jnp.asarray(start)
  q.cluster_size[...] = jnp.asarray([1.0, 1.0, 0.0])
  z = jnp.asarray([[[1., 0.], [0., 1.], [9., 11.]], [[2., 2.], [8., 8.], [100., 100.]]])  # [B=2, 3, 2]
  weights = jnp.asarray([1.0, 0.0])  # the second row is padding: it must not count
  _, indices = q(z)
  np.testing.assert_array_equal(indices[0], [0, 0, 1])
  out = q.update_ema(z, indices, jax.random.key(0), weights)
  counts = np.asarray([2.0, 1.0, 0.0])
  sums = np.asarray([[1., 1.], [9., 11.], [0., 0.]])
  cluster = 0.9 * np.asarray([1.0, 1.0, 0.0]) + 0.1 * counts
  embed_sum = 0.9 * start + 0.1 * sums
  total, eps = cluster.sum(), 1e-5
  smoothed = (cluster + eps) / (total + 3 * eps) * total
  np.testing.assert_allclose(np.asarray(q.codebook)[:2], (embed_sum / smoothed[:, None])[:2], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(q.cluster_size[...])[:2], cluster[:2], rtol=1e-6)
  # Code 2 (never used, EMA count 0 < 0.05) restarts at one of the valid rows' encoder outputs, never the padding's.
  assert float(out["restarted"]) == 1.0
  assert any(np.allclose(np.asarray(q.codebook)[2], row) for row in np.asarray(z[0]))
  assert float(q.cluster_size[...][2]) == pytest.approx(0.05)
  assert isinstance(q.embedding.embedding, CodebookState) and not nnx.state(q, nnx.Param)
  with pytest.raises(ValueError, match="needs a VectorQuantizer built with ema_decay > 0"):
    VectorQuantizer(3, 2, rngs=nnx.Rngs(0)).update_ema(z, indices, jax.random.key(0))


def _tiny(**vq):
  c = get_config("tiny")
  c.vae.vq.update(**vq)
  c.evals.reconstruction.max_examples = 64
  c.evals.codebook.max_examples = 64
  return c


def test_tiny_vqgan_run_carries_the_ema_codebook_reports_usage_and_exports_to_diffusers(tmp_path):
  config = _tiny()
  config.train.steps = 6
  config.vae.disc_weight = 0.5  # a VQGAN: the PatchGAN update beside the codebook's
  trainer = Trainer(config, str(tmp_path))
  start = np.asarray(trainer.init_state().mutable["vae"]["quantize"]["embedding"]["embedding"].get_value())
  trainer.train()
  metrics = read_metrics(str(tmp_path))
  train = [m for m in metrics if "train/vae/loss" in m]
  assert len(train) == 6 and train[0]["train/vae/count/restarted_codes"] > 0  # the first step seeds unused codes from the batch
  assert all(m["train/vae/codebook_loss"] == 0.0 and m["train/vae/commitment"] > 0 for m in train)
  assert all(np.isfinite(m["train/discriminator/d_loss"]) for m in train)
  final = metrics[-1]
  assert 0 < final["eval/codebook_usage"] <= 1 and final["eval/codebook_size"] == 16
  assert final["eval/codes_used"] == pytest.approx(16 * final["eval/codebook_usage"])
  assert 1 <= final["eval/codebook_perplexity"] <= final["eval/codes_used"] + 1e-6
  # The codebook is state the step wrote and the checkpoint holds, restored at load.
  again = Trainer(config, str(tmp_path))
  model = again.model_context(again.load_for_inference()).merge()
  trained = np.asarray(model.vae.quantize.codebook)
  assert not np.allclose(trained, start)
  # Export: diffusers' VQModel reads the trained tokenizer (EMA codebook included) to the same codes and pixels.
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from diffusion_jax.pretrained.vae import save_diffusers_vae
  save_diffusers_vae(model.vae, str(tmp_path / "export"))
  ref = diffusers.VQModel.from_pretrained(str(tmp_path / "export")).eval()
  images = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1), minval=-1, maxval=1)
  with torch.no_grad():
    x = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())
    latents = ref.encode(x).latents
    _, _, (_, _, ref_codes) = ref.quantize(latents)
    ref_pixels = ref.decode(latents).sample.numpy().transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(np.asarray(model.vae.tokenize(images)).reshape(-1), ref_codes.numpy())
  rec, _ = model.vae(images)
  np.testing.assert_allclose(np.asarray(rec), ref_pixels, atol=1e-4 * np.abs(ref_pixels).max())


def test_learned_codebook_is_a_parameter_with_its_loss_and_config_errors():
  task = get_task(_tiny(ema_decay=0.0))
  trainer = Trainer(task.config, "/nonexistent", task=task)
  state = trainer.init_state()
  assert "embedding" in state.params["vae"]["vae"]["quantize"]["embedding"]
  frozen = trainer.init_frozen()
  batch = {"image": jax.random.uniform(jax.random.key(0), (4, 28, 28, 1), minval=-1, maxval=1),
           "valid": jnp.ones((4,))}
  grads, metrics = jax.grad(lambda p: task.vae_loss(
      trainer.partition.merge(trainer.graphdef, frozen, dict(state.params, vae=p), state.mutable),
      batch, jax.random.key(0)), has_aux=True)(state.params["vae"])
  assert float(metrics["codebook_loss"]) > 0 and "count/restarted_codes" not in metrics
  assert float(jnp.abs(grads["vae"]["quantize"]["embedding"]["embedding"].get_value()).sum()) > 0
  for change, match in ((dict(ema_decay=1.0), "ema_decay must be in"), (dict(codebook_size=1), "codebook_size >= 2")):
    with pytest.raises(ConfigError, match=match):
      get_task(_tiny(**change))
  kl = get_config("tiny")
  kl.vae.bottleneck = "kl"
  kl.evals.codebook.every = 0
  with pytest.raises(ConfigError, match="codebook measures a discrete autoencoder"):
    Trainer(kl, "/nonexistent").evaluators  # noqa: B018


def test_gumbel_dvae_relaxation_kl_and_schedules():
  from diffusion_jax.models.vq import VQConfig
  vq = VQModel(VQConfig(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4, num_vq_embeddings=6,
                        vq_embed_dim=3, gumbel=True), rngs=nnx.Rngs(0))
  logits = jax.random.normal(jax.random.key(0), (2, 3, 3, 6)) * 3
  z, kl = vq.relaxed(logits, jax.random.key(1), 1.0)
  q = np.asarray(jax.nn.softmax(logits, -1), np.float64)
  np.testing.assert_allclose(kl, np.sum(q * np.log(q * 6), axis=-1).reshape(2, -1).sum(1), rtol=1e-5)
  # As τ → 0 the relaxation becomes the codebook row of argmax(logits + g), the same Gumbel draw.
  g = jax.random.gumbel(jax.random.key(1), logits.shape)
  cold, _ = vq.relaxed(logits, jax.random.key(1), 1e-4)
  np.testing.assert_allclose(cold, vq.quantize.lookup(jnp.argmax(logits + g, -1)), atol=1e-5)
  assert z.shape == (2, 3, 3, 3) and not np.allclose(z, cold)
  # Gradients reach the logits and the codebook (no straight-through needed).
  d_logits, d_book = jax.grad(lambda l, v: v.relaxed(l, jax.random.key(1), 0.5)[0].sum(), argnums=(0, 1))(
      logits, vq)
  assert float(jnp.abs(d_logits).sum()) > 0
  assert float(jnp.abs(d_book.quantize.embedding.embedding.get_value()).sum()) > 0
  with pytest.raises(ValueError, match="ema_decay must be 0"):
    VQModel(VQConfig(gumbel=True, ema_decay=0.9), rngs=nnx.Rngs(0))
  task = get_task(get_config("dvae,tiny"))
  g = task.config.vae.gumbel
  tau, beta = task._gumbel_schedule(0)
  assert float(tau) == 1.0 and float(beta) == 0.0
  tau, beta = task._gumbel_schedule(g.anneal_steps // 2)
  assert float(tau) == pytest.approx((g.tau_start * g.tau_end) ** 0.5, rel=1e-5)
  tau, beta = task._gumbel_schedule(10 * g.anneal_steps)
  assert float(tau) == pytest.approx(g.tau_end) and float(beta) == pytest.approx(g.kl_weight)
  bad = get_config("dvae,tiny")
  bad.vae.gumbel.tau_end = 2.0
  with pytest.raises(ConfigError, match="need 0 < tau_end <= tau_start"):
    get_task(bad)
