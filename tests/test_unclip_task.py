"""unCLIP on the shared trainer: a tiny CLIP run (its saved initialisation) → the diffusion prior (its statistics,
health evaluation) → the decoder (frozen towers and prior restored as they were trained, image embedding dropped on its
own) → the text → image chain, its ablations, variations and interpolation strips, and the one-line errors around
them."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs.mnist_unclip import get_config
from diffusion_jax.config import ConfigError
from diffusion_jax.data import mnist
from diffusion_jax.tasks import unclip_prior
from diffusion_jax.evaluators.digits import DigitAccuracy
from diffusion_jax.tasks.unclip_decoder import slerp, text_diff
from diffusion_jax.pretrained import weights
from diffusion_jax.train import parts
from diffusion_jax.train.trainer import Trainer
from tests.runs import unclip_clip_run
from tests.test_contrastive_task import _params


def _decoder_config(root, **unclip):
  c = get_config("tiny")
  c.text.clip_workdir = root["clip"]
  c.unclip.update(dict(dict(prior_workdir=root["prior"]), **unclip))
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("unclip")
  root = {name: str(base / name) for name in ("clip", "prior", "decoder", "other_clip")}
  clip = unclip_clip_run(root["clip"])
  c = get_config("prior,tiny")
  c.text.clip_workdir = root["clip"]
  c.train.sample_at_end = False
  prior = Trainer(c, root["prior"])
  prior_state = prior.train()
  decoder = Trainer(_decoder_config(root), root["decoder"])
  decoder_state = decoder.train()
  return root, (clip, prior, prior_state, decoder, decoder_state)


def test_prior_records_embedding_statistics_and_reports_its_health(runs):
  root, (clip, prior, prior_state, *_) = runs
  stats = unclip_prior.read_stats(root["prior"])
  assert stats["mean"].shape == stats["std"].shape == (16,)
  assert stats["examples"] == 64 and np.all(stats["std"] > 0)
  # The statistics are those of the CLIP image embeddings of the first training images.
  ctx = prior.model_context(prior_state)
  images = np.stack([np.asarray(b["image"]) for b in [next(iter(_first_batch(prior.config)))]])[0]
  emb = np.asarray(ctx.jit(prior.task.embed_images)(images))
  np.testing.assert_allclose(emb.mean(0), stats["mean"], rtol=1e-4, atol=1e-5)
  metrics = json.loads(open(os.path.join(root["prior"], "metrics.jsonl")).read().splitlines()[-1])
  for key in ("eval/prior_cosine", "eval/text_image_cosine", "eval/unrelated_cosine", "eval/prior_zero_shot"):
    assert -1.0 <= metrics[key] <= 1.0, key
  # The frozen CLIP and the prior's own normalisation are not checkpointed; the trained prior is.
  trained = {k.split(".")[0] for update in prior_state.params.values() for k in parts.flat_names(update)}
  assert trained == {"prior"}
  assert not any(k.startswith("prior.clip_") for u in prior_state.params.values() for k in parts.flat_names(u))


def _first_batch(config):
  from diffusion_jax.data import pipeline
  d = config.data
  return pipeline.make_dataset(d, d.train_split, global_batch_size=64, seed=int(config.seed), shuffle=False,
                               repeat=False, drop_remainder=False)


def test_decoder_holds_the_frozen_towers_and_prior_it_was_given(runs):
  root, (clip, prior, prior_state, decoder, decoder_state) = runs
  got = _params(decoder, decoder_state)
  clip_params = _params(clip, clip.load_for_inference())
  for k, v in clip_params.items():
    if k.startswith(("vision_model.", "visual_projection.")):
      np.testing.assert_array_equal(got["conditioners.clip_image.tower." + k], v)
    if k.startswith(("text_model.", "text_projection.")):
      np.testing.assert_array_equal(got["conditioners.clip_text.tower." + k], v)
  ema = weights.model_arrays(prior.partition.merge(prior.graphdef, prior.frozen, prior_state.ema,
                                                   prior_state.mutable))
  for k, v in ema.items():  # the prior run evaluates with its EMA, so a decoder restores that
    if k.startswith("prior.") and not k.startswith("prior.clip_"):
      np.testing.assert_array_equal(got[k], v)
  trained = {k.split(".")[0] for u in decoder_state.params.values() for k in parts.flat_names(u)}
  assert trained == {"denoiser"}


def test_image_embedding_drops_on_its_own_and_marks_the_rows(runs):
  root, (*_, decoder, decoder_state) = runs
  drops = decoder.task.draw_drops(jax.random.key(0), 4000)
  text, image = np.asarray(drops["clip_text"]), np.asarray(drops["clip_image"])
  assert abs(text.mean() - 0.5) < 0.03 and abs(image.mean() - 0.1) < 0.02
  assert abs(np.mean(text & image) - 0.05) < 0.015  # independent

  def contexts(model, tokens, images):
    batch = {"tokens": tokens, "image": images}
    cond = model.condition(batch, {"clip_text": jnp.array([False, False]), "clip_image": jnp.array([True, False])})
    proj = model.denoiser.text_proj
    a = proj(cond["image_embedding"], cond["text_pooled"], cond["text_states"], drop_image=cond["image_dropped"])
    b = proj(cond["image_embedding"] + 1.0, cond["text_pooled"], cond["text_states"],
             drop_image=cond["image_dropped"])
    return cond["image_dropped"], a[0], b[0]

  ctx = decoder.model_context(decoder_state)
  dropped, a, b = ctx.jit(contexts)(np.zeros((2, 16), np.int32), np.zeros((2, 28, 28, 1), np.float32))
  assert np.asarray(dropped).tolist() == [True, False]
  # A dropped row's context is that of the learned null embedding, whatever the image was.
  np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b)[0])
  assert not np.allclose(np.asarray(a)[1], np.asarray(b)[1])


def test_chain_samples_and_the_ablations_decode_different_embeddings(runs):
  root, (*_, decoder, decoder_state) = runs
  out = decoder.sample()  # text → prior → decoder, the per-digit grid
  index = [json.loads(l) for l in open(out["index"])]
  assert [r["label"] for r in index] == list(range(10)) and len(out["files"]) == 10
  ctx = decoder.model_context(decoder_state)
  task = decoder.task
  tokens = task.prompt_inputs(["a handwritten digit three", "a handwritten digit seven"])["tokens"]
  text = np.asarray(ctx.jit(lambda m, t: m.conditioners["clip_text"].tower(t)[1])(tokens))
  got = {}
  for mode in ("prior", "text", "zero"):
    task.config.unclip.image_embedding = mode
    got[mode] = np.asarray(ctx.jit(lambda m, t, r: task._embeddings(m, {"tokens": t}, r), key=mode)(
        tokens, jax.random.key(0)))
  task.config.unclip.image_embedding = "prior"
  np.testing.assert_allclose(got["text"], text, rtol=1e-6)
  # The digit evaluator also scores the samples with the frozen towers (CLIP score).
  spec = decoder.config.evals.digits
  metrics = DigitAccuracy("digits", task, decoder.config, ml_collections.ConfigDict(dict(spec, clip_score=True))).run(ctx)
  assert 0.0 <= metrics["digit_accuracy"] <= 1.0 and -100.0 <= metrics["digit_accuracy_clip_score"] <= 100.0
  np.testing.assert_array_equal(got["zero"], 0.0)
  assert got["prior"].shape == text.shape and np.all(np.isfinite(got["prior"]))
  assert not np.allclose(got["prior"], text, atol=1e-3)


def test_variations_and_interpolation_strips(runs, tmp_path):
  root, (*_, decoder, decoder_state) = runs
  x, y = mnist.load_mnist("test")
  paths = []
  for i in range(2):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(x[i].astype(np.uint8)).save(paths[-1])
  s = decoder.config.sample
  try:
    # Both decode 4 embeddings: one compiled program.
    s.update(variations_of=tuple(paths), per_prompt=2)
    out = decoder.sample()
    index = [json.loads(l) for l in open(out["index"])]
    assert [r["variation_of"] for r in index] == [paths[0]] * 2 + [paths[1]] * 2
    s.update(variations_of=(), interpolate=tuple(paths), per_prompt=4)
    out = decoder.sample()
    weights = [json.loads(l)["weight"] for l in open(out["index"])]
    np.testing.assert_allclose(weights, [0.0, 1 / 3, 2 / 3, 1.0])
    s.update(interpolate=(), text_diff=(paths[0], "a handwritten digit seven", "a handwritten digit one"))
    out = decoder.sample()
    index = [json.loads(l) for l in open(out["index"])]
    np.testing.assert_allclose([r["weight"] for r in index], [0.0, 1 / 6, 1 / 3, 0.5])
    assert index[0]["to"] == "a handwritten digit one"
    s.update(text_diff=(), variations_heldout=2, per_prompt=2)
    out = decoder.sample()
    index = [json.loads(l) for l in open(out["index"])]
    assert [(r["example"], r["kind"]) for r in index] == [
        (i, k) for i in range(2) for k in ("source", "variation", "variation")]
    for i in range(2):  # each row starts with its held-out source: the first test digits
      source = np.asarray(Image.open(out["files"][3 * i]).convert("L"), np.int32)
      assert np.abs(source - x[i]).max() <= 1
    s.update(variations_heldout=0, interpolate=(paths[0],))
    with pytest.raises(ConfigError, match="two image files"):
      decoder.sample()
  finally:
    s.update(variations_of=(), variations_heldout=0, interpolate=(), text_diff=(), per_prompt=1)


def test_variations_evaluator_scores_the_decoder_against_random_pairs(runs, monkeypatch):
  from diffusion_jax.defaults import evaluator
  from diffusion_jax.evaluators.unclip import Variations
  root, (*_, decoder, decoder_state) = runs
  ctx = decoder.model_context(decoder_state)
  judged = Variations("variations", decoder.task, decoder.config,
                      evaluator("variations", batch_size=8, max_examples=2, per_image=2))
  got = judged.run(ctx)  # the real chain: 2 variations of each of 2 held-out digits (the strips' program)
  assert got["examples"] == 2 and 0.0 <= got["variation_source_top1"] <= 1.0
  assert all(-1.0 <= got[k] <= 1.0 for k in ("variation_similarity", "variation_to_others", "random_pair_similarity"))
  x, _ = mnist.load_mnist("test")
  sources = x[:4].astype(np.float32)[..., None] / 127.5 - 1.0
  emb = decoder.task.image_embeddings(ctx, sources)
  unit = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  pairs = unit @ unit.T
  np.testing.assert_allclose(got["random_pair_similarity"], pairs[0, 1], rtol=1e-5)

  # A decoder that gives back each source (at twice the size, as after an upsampler) is judged perfect, and its
  # similarity to the other sources is the random-pair baseline; one that gives back the wrong sources is not.
  def replay(shift):
    def generate(ctx, embeddings, seed, prompts=None):
      owner = [int(np.argmin(np.abs(emb - e).sum(axis=-1))) for e in embeddings]
      return np.repeat(np.repeat(sources[np.roll(owner, shift)], 2, axis=1), 2, axis=2)
    return generate
  monkeypatch.setattr(decoder.task, "generate_from_embeddings", replay(0))
  perfect = decoder.task.variation_scores(ctx, sources, per_image=2, seed=0)
  np.testing.assert_allclose([perfect["variation_similarity"], perfect["variation_source_top1"]], [1.0, 1.0],
                             rtol=1e-5)
  np.testing.assert_allclose(perfect["variation_to_others"], perfect["random_pair_similarity"], rtol=1e-5)
  monkeypatch.setattr(decoder.task, "generate_from_embeddings", replay(2))  # each pair of variations: a neighbour's
  wrong = decoder.task.variation_scores(ctx, sources, per_image=2, seed=0)
  assert wrong["variation_source_top1"] == 0.0 and wrong["variation_similarity"] < perfect["variation_similarity"]
  with pytest.raises(ConfigError, match="at least 2 held-out images"):
    decoder.task.variation_scores(ctx, sources[:1], per_image=2, seed=0)


def test_text_diff_turns_the_embedding_towards_the_caption_difference():
  image, before, after = np.array([2.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), np.array([0.0, 1.0, 3.0])
  rows = text_diff(image, before, after, [0.0, 0.5, 1.0])
  np.testing.assert_allclose(rows[0], image, atol=1e-6)
  np.testing.assert_allclose(rows[2], [0.0, 0.0, 2.0], atol=1e-6)  # the unit difference, at the image's norm
  np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 2.0, rtol=1e-6)


def test_slerp_keeps_the_ends_and_interpolates_norms():
  a, b = np.array([3.0, 0.0]), np.array([0.0, 1.0])
  rows = slerp(a, b, [0.0, 0.5, 1.0])
  np.testing.assert_allclose(rows[0], a, atol=1e-6)
  np.testing.assert_allclose(rows[2], b, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(rows[1]), 2.0, rtol=1e-6)
  np.testing.assert_allclose(rows[1] / 2.0, [np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-6)


def test_one_line_errors(runs, tmp_path):
  root, _ = runs
  c = _decoder_config(root, prior_workdir="", image_embedding="prior")
  trainer = Trainer(c, root["decoder"])
  # The prior is only used in sampling, so the decoder run restarts with another one or none.
  state = trainer.load_for_inference()
  assert state is not None
  ctx = trainer.model_context(state)
  with pytest.raises(ConfigError, match="set unclip.prior_workdir"):
    trainer.task.generate(ctx, ["a handwritten digit one"], seed=0)
  # A run that would end by sampling captions through the chain without a prior is refused before it compiles.
  c.train.update(steps=6, sample_at_end=True)
  c.evals.digits.every = -1
  fresh = Trainer(c, str(tmp_path / "no_prior"))
  with pytest.raises(ConfigError, match="set unclip.prior_workdir"):
    fresh.train()
  assert fresh.frozen is None and not os.path.exists(os.path.join(fresh.workdir, "checkpoints"))
  c.sample.variations_heldout = 2  # ending with variations of held-out images needs no prior
  Trainer(c, str(tmp_path / "no_prior")).task.check_run()
  c = _decoder_config(root, image_embedding="clip")
  with pytest.raises(ConfigError, match="unclip.image_embedding must be one of"):
    Trainer(c, str(tmp_path / "x"))
  # A prior trained on another CLIP run lives in another embedding space.
  shutil.copytree(root["clip"], root["other_clip"])
  c = _decoder_config(root)
  c.text.clip_workdir = root["other_clip"]
  with pytest.raises(ConfigError, match="must come from the same CLIP"):
    Trainer(c, str(tmp_path / "y"))
