"""DALL-E 1 (`models.dalle`, `tasks.dalle`): cached, guided sampling against teacher forcing, image completion,
the loss's token weighting, CLIP reranking against the scores it ranks by, the likelihood evaluator, a tiny run
end to end and its one-line errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.mnist_dalle import get_config
from configs.mnist_vq import get_config as vq_config
from diffusion_jax.config import ConfigError
from diffusion_jax.models.dalle import Dalle, DalleConfig
from diffusion_jax.models.decoder import DecoderConfig
from diffusion_jax.train.metrics_writer import read_metrics
from diffusion_jax.train.task import get_task
from diffusion_jax.train.trainer import Trainer
from tests.runs import clip_config, saved_run


def _dalle(seed=0):
  lm = DecoderConfig(width=32, layers=2, heads=2, mlp_dim=64)
  cfg = DalleConfig.build(lm, text_vocab=11, text_len=5, codes=7, grid=(3, 4))
  return Dalle(cfg, rngs=nnx.Rngs(seed))


def test_cached_guided_sampling_is_greedy_decoding_of_the_guided_teacher_forced_logits():
  model = _dalle()
  cfg = model.config
  assert cfg.lm.vocab_size == 7 + 1 + 11 and cfg.lm.max_len == 5 + 1 + 12
  text = jnp.asarray([[3, 4, 5, 0, 0], [7, 1, 0, 0, 0]])
  null = jnp.asarray([[0, 0, 0, 0, 0]])
  for scale, prefix in ((1.0, None), (2.5, None), (2.5, jnp.asarray([[6, 5, 4, 3], [0, 1, 2, 3]]))):
    codes = model.sample(text, null, jax.random.key(0), guidance_scale=scale, temperature=0.0, prefix=prefix)
    assert codes.shape == (2, 12) and int(codes.max()) < 7
    if prefix is not None:
      np.testing.assert_array_equal(codes[:, :4], prefix)
    # Greedy decoding with the cache must pick, at every image position, the argmax over the code ids of the guided
    # logits the whole-sequence pass gives for the sequence it produced (row and column embeddings included).
    cond = model(text, codes)[:, cfg.text_len:, :cfg.codes]
    uncond = model(jnp.broadcast_to(null, text.shape), codes)[:, cfg.text_len:, :cfg.codes]
    guided = uncond + scale * (cond - uncond)
    start = 0 if prefix is None else prefix.shape[1]
    np.testing.assert_array_equal(np.asarray(codes)[:, start:], np.asarray(jnp.argmax(guided, -1))[:, start:])
  with pytest.raises(ValueError, match="leaves nothing to draw"):
    model.sample(text, null, jax.random.key(0), guidance_scale=1.0, prefix=jnp.zeros((2, 12), jnp.int32))


def test_grid_embeddings_tell_rows_and_columns_apart():
  model = _dalle()
  ids = jnp.full((1, 18), 2, jnp.int32)
  x = np.asarray(model.embed(ids, jnp.arange(18)[None]))[0]
  np.testing.assert_allclose(x[0], x[5])  # caption and image-start positions: the token embedding alone
  image = x[6:]  # 12 codes on a 3 × 4 grid: every position distinct, code (1, 2) = token + row 1 + column 2
  assert len({tuple(np.round(v, 6)) for v in image}) == 12
  want = x[0] + np.asarray(model.row_embedding[...])[1] + np.asarray(model.col_embedding[...])[2]
  np.testing.assert_allclose(image[1 * 4 + 2], want, atol=1e-7)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("dalle")
  saved_run(vq_config("tiny"), str(root / "vq"))
  saved_run(clip_config("tiny"), str(root / "clip"))
  config = get_config("tiny")
  config.dalle.update(vq_workdir=str(root / "vq"), clip_workdir=str(root / "clip"))
  trainer = Trainer(config, str(root / "dalle"))
  trainer.train()
  return root, config, trainer


def test_tiny_run_trains_evaluates_reranks_and_samples(runs):
  root, config, _ = runs
  metrics = read_metrics(str(root / "dalle"))
  train = [m for m in metrics if "train/loss" in m]
  w = config.dalle.text_loss_weight
  for m in train:
    assert m["train/loss"] == pytest.approx(w * m["train/text_loss"] + (1 - w) * m["train/image_loss"], rel=1e-5)
  final = metrics[-1]
  assert {"eval/digit_accuracy", "eval/digit_accuracy_single", "eval/image_nll_bits_per_token"} <= set(final)
  tokens = 7 * 7  # the tiny tokenizer's 28 px → 7 × 7 grid
  assert final["eval/image_nll_bits_per_dim"] == pytest.approx(
      final["eval/image_nll_bits_per_token"] * tokens / (28 * 28), rel=1e-6)
  # An untrained model's codes are near uniform over the 16 codes: about 4 bits each.
  assert 3.0 < final["eval/image_nll_bits_per_token"] < 5.0
  assert (root / "dalle" / "samples").is_dir()


def test_reranking_keeps_the_candidate_the_clip_scores_highest(runs):
  root, config, trainer = runs
  task = trainer.task
  ctx = trainer.model_context(trainer.load_for_inference())
  prompts = ["a handwritten digit three", "a handwritten digit seven"]
  inputs = task.prompt_inputs(prompts)
  rng = jax.random.key(5)
  k = 3
  every = ctx.jit(task._generate_fn(3.0, 1))(
      {name: np.repeat(v, k, axis=0) for name, v in inputs.items()}, rng)  # the same draws, all kept
  best = ctx.jit(task._generate_fn(3.0, k))(inputs, rng)
  model = ctx.merge()
  scores = np.asarray(task._clip_scores(model.reranker, jnp.asarray(every),
                                        jnp.repeat(jnp.asarray(inputs["clip_tokens"]), k, axis=0))).reshape(2, k)
  for i in range(2):
    np.testing.assert_allclose(best[i], every[i * k + int(np.argmax(scores[i]))], atol=1e-6)
  # Completion keeps the given rows of the source's codes and draws the rest; `generate` decodes the same draws.
  source = np.asarray(jax.random.uniform(jax.random.key(2), (2, 28, 28, 1), minval=-1, maxval=1))
  inputs = dict(inputs, image=source)
  codes = np.asarray(ctx.jit(lambda m, x, r: task.draw_codes(m, x, r, 3.0, rows_given=3))(inputs, rng))
  given = np.asarray(model.vae.tokenize(jnp.asarray(source))).reshape(2, -1)
  np.testing.assert_array_equal(codes[:, :3 * 7], given[:, :3 * 7])
  assert not np.array_equal(codes[:, 3 * 7:], given[:, 3 * 7:])
  done = ctx.jit(task._generate_fn(3.0, 1, rows_given=3))(inputs, rng)
  np.testing.assert_allclose(done, np.clip(model.vae.decode_indices(jnp.asarray(codes).reshape(2, 7, 7)), -1, 1),
                             atol=1e-5)
  with pytest.raises(ConfigError, match="rows_given=7 must leave rows"):
    task.generate(ctx, prompts, 0, candidates=1, images=source, rows_given=7)
  # `--mode sample --config.sample.complete_rows=R`: rows of a held-out image and its completions, captioned.
  written = task._completions(ctx, str(root / "completions"), rows=3, count=2, per=2)
  import json
  index = [json.loads(line) for line in open(root / "completions" / "index.jsonl")]
  assert written and len(index) == 2 * 3
  assert [r["kind"] for r in index[:3]] == ["source"] + ["completion of the first 3 rows"] * 2
  assert index[0]["prompt"] == index[1]["prompt"] == "a handwritten digit seven"  # MNIST's first test digit


def test_one_line_errors(runs):
  root, config, _ = runs
  bad = get_config("tiny")
  bad.dalle.update(vq_workdir=str(root / "vq"), clip_workdir="")
  with pytest.raises(ConfigError, match="sample.candidates=2 reranks with a CLIP run"):
    get_task(bad)
  kl = vq_config("tiny")
  kl.vae.bottleneck = "kl"
  del kl.evals["codebook"]
  saved_run(kl, str(root / "kl"))
  bad.dalle.update(vq_workdir=str(root / "kl"), clip_workdir=str(root / "clip"))
  with pytest.raises(ConfigError, match="is a KL autoencoder; DALL-E needs discrete codes"):
    get_task(bad)
  bad.dalle.vq_workdir = str(root / "clip")
  with pytest.raises(ConfigError, match="is a 'contrastive' run, not a 'autoencoder' run"):
    get_task(bad)


def test_text_retrieval_ranks_each_images_own_caption(runs):
  from diffusion_jax.defaults import evaluator
  from diffusion_jax.evaluators.text_to_image_retrieval import TextRetrieval, recall_at
  sim = np.asarray([[0.9, 0.1, 0.2], [0.8, 0.5, 0.1], [0.3, 0.3, 0.3]])
  # row 0: own caption first; row 1: second; row 2: tied with both others, which counts against it (rank 2)
  assert recall_at(sim, ks=(1, 2, 3)) == {"r1": 1 / 3, "r2": 2 / 3, "r3": 1.0}
  root, config, trainer = runs
  spec = evaluator("text_retrieval", batch_size=8, max_examples=8, candidates=1)
  judged = TextRetrieval("retrieval", trainer.task, config, spec)
  got = judged.run(trainer.model_context(trainer.load_for_inference()))
  assert got["text_retrieval_examples"] == 8.0
  for k in ("r1", "r5", "r10", "real_r1"):
    assert 0.0 <= got[f"text_retrieval_{k}"] <= 1.0
  assert got["text_retrieval_r10"] == 1.0  # 8 captions: every one is in the top 10
  # The fid evaluator's 'captions' source draws one image per eval caption, judged in the CLIP the config names.
  from diffusion_jax.evaluators.fid import FID
  spec = evaluator("fid", batch_size=8, features="clip", source="captions", num_samples=8, frechet=False,
                   precision_recall=True)
  scored = FID("fid", trainer.task, config, spec).run(trainer.model_context(trainer.load_for_inference()))
  assert set(scored) == {"fid_clip_kid", "fid_clip_kid_std", "fid_clip_precision", "fid_clip_recall"}
  assert 0.0 <= scored["fid_clip_precision"] <= 1.0
  config = config.copy_and_resolve_references()
  config.dalle.clip_workdir = ""
  with pytest.raises(ConfigError, match="clip_workdir is empty"):
    TextRetrieval("retrieval", trainer.task, config, evaluator("text_retrieval", candidates=1))
