"""unCLIP's autoregressive prior: PCA + bucket codes round-trip, guided cached sampling equals recomputing the guided
logits, and the chain tiny CLIP run (its saved initialisation) → AR prior run (its PCA record, prior_health) → decoder
sampling through it."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.mnist_unclip import get_config
from diffusion_jax.autoregressive.embedding_codes import EmbeddingCodes
from diffusion_jax.models.ar_prior import ARPrior, ARPriorConfig
from diffusion_jax.models.decoder import DecoderConfig
from diffusion_jax.pretrained import weights
from diffusion_jax.tasks.unclip_ar_prior import PCA_FILE
from diffusion_jax.train import parts
from diffusion_jax.train.metrics_writer import read_metrics
from diffusion_jax.train.trainer import Trainer
from tests.runs import unclip_clip_run
from tests.test_clip_models import random_model, run


def test_codes_round_trip_and_equal_mass_buckets():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4000, 6)) @ rng.normal(size=(6, 6)) * np.array([3.0, 2, 1, 1, 0.5, 0.1]) + 2.0
  errors = []
  for bins in (4, 16, 64, 256):
    codes = EmbeddingCodes.fit(x, components=6, bins=bins)
    tokens = np.asarray(codes.encode(x))
    assert tokens.shape == (4000, 6) and tokens.min() == 0 and tokens.max() == bins - 1
    errors.append(np.mean((np.asarray(codes.decode(tokens)) - x) ** 2) / np.var(x))
    # Equal-mass buckets: every code of every dimension equally frequent in the fitted data.
    counts = np.stack([np.bincount(tokens[:, i], minlength=bins) for i in range(6)])
    assert counts.min() >= 4000 / bins - 2 and counts.max() <= 4000 / bins + 2
  assert errors[-1] < 2e-3 and all(a > b for a, b in zip(errors, errors[1:])), errors
  # Fewer components: the largest variances first, their share recorded; the record round-trips.
  codes = EmbeddingCodes.fit(x, components=2, bins=64)
  ratio = codes.explained_variance_ratio
  assert ratio[0] >= ratio[1] and 0.5 < ratio.sum() < 1.0
  again = EmbeddingCodes.from_record(json.loads(json.dumps(codes.to_record())))
  np.testing.assert_array_equal(again.decode(again.encode(x)), codes.decode(codes.encode(x)))


def test_guided_cached_sampling_equals_recomputing_the_guided_logits():
  cfg = ARPriorConfig.for_codes(DecoderConfig(width=32, layers=2, heads=4, mlp_dim=64), text_vocab=20, text_len=5,
                                embed_dim=8, text_prefix=2, components=6, bins=10)
  prior = random_model(lambda: ARPrior(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(1)
  tokens, text = rng.integers(0, 20, (3, 5)), rng.normal(size=(3, 8))
  null_tokens, null_text = np.zeros((1, 5), np.int64), rng.normal(size=(1, 8))
  scale = 3.0

  def both(m, tokens, text, null_tokens, null_text, key):
    out = m.sample(tokens, text, null_tokens, null_text, key, guidance_scale=scale, temperature=1.0,
                   return_logits=True)
    # The same codes again, every step recomputed from the whole sequence, conditional and unconditional.
    cond = m(tokens, text, out.tokens)
    uncond = m(jnp.broadcast_to(null_tokens, tokens.shape), jnp.broadcast_to(null_text, text.shape), out.tokens)
    return out, uncond + scale * (cond - uncond)

  out, recomputed = run(prior, both, tokens, text, null_tokens, null_text, jax.random.key(0))
  assert out.tokens.shape == (3, 6) and np.all((0 <= out.tokens) & (out.tokens < 10))
  np.testing.assert_allclose(out.logits[..., :10], recomputed, atol=1e-4)
  assert np.all(np.isneginf(out.logits[..., 10:]))  # separator and caption ids are never drawn


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("unclip_ar")
  root = {name: str(base / name) for name in ("clip", "ar_prior", "decoder")}
  unclip_clip_run(root["clip"])
  c = get_config("ar_prior,tiny")
  c.text.clip_workdir = root["clip"]
  c.train.sample_at_end = False
  prior = Trainer(c, root["ar_prior"])
  prior_state = prior.train()
  return root, prior, prior_state


def test_ar_prior_records_its_pca_and_reports_its_health(runs):
  root, prior, prior_state = runs
  record = json.load(open(os.path.join(root["ar_prior"], PCA_FILE)))
  assert np.shape(record["components"]) == (4, 16) and np.shape(record["edges"]) == (4, 9)
  assert np.shape(record["centres"]) == (4, 8) and record["examples"] == 64
  assert 0 < record["explained_variance"] <= 1 and record["clip"]["path"] == os.path.abspath(root["clip"])
  final = [r for r in read_metrics(root["ar_prior"]) if "eval/prior_cosine" in r][-1]
  for key in ("eval/prior_cosine", "eval/text_image_cosine", "eval/unrelated_cosine", "eval/prior_zero_shot"):
    assert -1.0 <= final[key] <= 1.0, key
  trained = {k.split(".")[0] for update in prior_state.params.values() for k in parts.flat_names(update)}
  assert trained == {"prior"}  # the CLIP towers stay frozen and out of the checkpoint
  # Sampled embeddings are decoded codes: points of the PCA's bucket grid. (16 prompts: health's compiled program.)
  ctx = prior.model_context(prior_state)
  emb = prior.task.prompt_embeddings(ctx, ["a handwritten digit seven"] * 16, seed=0)
  codes = prior.task.codes
  np.testing.assert_allclose(np.asarray(codes.decode(codes.encode(emb))), emb, atol=1e-4)


def test_decoder_samples_through_the_ar_prior(runs):
  root, prior, prior_state = runs
  c = get_config("tiny")
  c.text.clip_workdir = root["clip"]
  c.unclip.prior_workdir = root["ar_prior"]
  decoder = Trainer(c, root["decoder"])
  # A decoder at its initialisation (training it changes nothing here): the frozen AR prior restored into it.
  state, _ = decoder.restore_or_init(decoder.checkpointer())
  ctx = decoder.model_context(state)
  decoder.task.prepare(ctx, training=False)
  assert decoder.task.prior_task.codes is not None  # the prior run's PCA record, read by the decoder
  got = weights.model_arrays(ctx.merge())
  ema = weights.model_arrays(prior.partition.merge(prior.graphdef, prior.frozen, prior_state.ema, prior_state.mutable))
  names = [k for k in ema if k.startswith("prior.")]
  assert names and all(np.array_equal(got[k], ema[k]) for k in names)
  images = decoder.task.generate(ctx, ["a handwritten digit three"] * 2, seed=0)
  assert images.shape == (2, 28, 28, 1) and np.all(np.isfinite(images))
