"""Guidance by gradients (diffusion/gradient_guidance.py, tasks/guides.py) and the noise-aware classifier it uses
(tasks/noisy_classifier.py): the shift of epsilon by the score's gradient in every parameterisation, and a
classifier-guided unconditional run whose samples the classifier prefers, with the guides' one-line errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.mnist_ddpm import get_config as ddpm_config
from configs.mnist_noisy_classifier import get_config as classifier_config
from diffusion_jax.config import ConfigError
from diffusion_jax.diffusion import gradient_guidance, schedules
from diffusion_jax.train.task import get_task
from diffusion_jax.train.trainer import Trainer
from tests.runs import saved_run


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_gradient_guidance_shifts_epsilon_by_the_scaled_score_gradient(prediction_type):
  schedule = schedules.NoiseSchedule.create("cosine", 1000)
  x = jax.random.normal(jax.random.key(0), (3, 4, 4, 1))
  t = jnp.array([50, 400, 900])
  w = jax.random.normal(jax.random.key(1), x.shape)
  model_fn = lambda x, t: 0.5 * x + 0.1  # any output that depends on x
  a = schedule.alphas_cumprod[t][:, None, None, None]
  _, eps = schedules.x0_and_eps(model_fn(x, t), x, a, prediction_type)
  scale = jnp.array([2.0, 0.0, 3.0])  # the middle row is unguided
  s = scale[:, None, None, None]

  # A score of x_t: its gradient is w.
  on_x = gradient_guidance.gradient_guidance(model_fn, schedule, lambda x, t, x0: jnp.sum(w * x, axis=(1, 2, 3)),
                                             scale, prediction_type)
  _, got = schedules.x0_and_eps(on_x(x, t), x, a, prediction_type)
  np.testing.assert_allclose(got, eps - s * jnp.sqrt(1 - a) * w, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got[1], eps[1], rtol=1e-5, atol=1e-6)

  # A score of the predicted x_0, with the model's epsilon held fixed: d x0 / d x_t = 1 / sqrt(abar).
  on_x0 = gradient_guidance.gradient_guidance(model_fn, schedule, lambda x, t, x0: jnp.sum(w * x0, axis=(1, 2, 3)),
                                              scale, prediction_type)
  _, got = schedules.x0_and_eps(on_x0(x, t), x, a, prediction_type)
  np.testing.assert_allclose(got, eps - s * jnp.sqrt(1 - a) * w / jnp.sqrt(a), rtol=1e-4, atol=1e-5)

  # Through the model as well: with epsilon = 0.5 x + 0.1, d x0 / d x_t = (1 - 0.5 sqrt(1 - abar)) / sqrt(abar).
  if prediction_type == "epsilon":
    through = gradient_guidance.gradient_guidance(model_fn, schedule,
                                                  lambda x, t, x0: jnp.sum(w * x0, axis=(1, 2, 3)), scale,
                                                  prediction_type, through_model=True)
    _, got = schedules.x0_and_eps(through(x, t), x, a, prediction_type)
    dx0 = (1 - 0.5 * jnp.sqrt(1 - a)) / jnp.sqrt(a)
    np.testing.assert_allclose(got, eps - s * jnp.sqrt(1 - a) * w * dx0, rtol=1e-4, atol=1e-5)


def test_classifier_score_is_the_label_log_probability_and_zero_without_a_label():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
  score = gradient_guidance.classifier_score(lambda x, t: logits, jnp.array([0, 2, -1]))
  got = score(None, None, None)
  want = jax.nn.log_softmax(logits)[jnp.arange(2), jnp.array([0, 2])]
  np.testing.assert_allclose(got[:2], want, rtol=1e-6)
  assert got[2] == 0.0


def test_clip_score_is_the_cosine_to_each_caption_and_cutouts_stay_finite():
  embed = lambda images: jnp.mean(images, axis=(1, 2))  # a 3-d "embedding" of an RGB image
  images = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3), minval=-1, maxval=1)
  text = jnp.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
  got = gradient_guidance.clip_score(embed, text)(None, None, images)
  e = embed(images) / jnp.linalg.norm(embed(images), axis=-1, keepdims=True)
  np.testing.assert_allclose(got, [e[0, 0], e[1, 1]], rtol=1e-5)
  cut = gradient_guidance.clip_score(embed, text, cutouts=3, rng=jax.random.key(1))(None, None, images)
  assert cut.shape == (2,) and np.all(np.isfinite(cut)) and not np.allclose(cut, got)


@pytest.fixture(scope="module")
def guided_runs(tmp_path_factory):
  """A tiny noise-aware classifier and a tiny unconditional DDPM, both at their random initialisation."""
  root = tmp_path_factory.mktemp("guided")
  saved_run(classifier_config("tiny"), str(root / "classifier"))
  uncond = ddpm_config("tiny")
  uncond.model.conditioners = ()
  saved_run(uncond, str(root / "uncond"))
  return str(root / "classifier"), str(root / "uncond")


def _uncond(classifier_workdir: str = "", scale: float = 0.0, **overrides):
  c = ddpm_config("tiny")
  c.model.conditioners = ()
  c.sample.guidance_scale = 1.0
  c.sample.classifier_guidance.update(workdir=classifier_workdir, scale=scale)
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def test_classifier_guidance_steers_samples_to_what_the_classifier_calls_their_label(guided_runs):
  classifier_wd, uncond_wd = guided_runs
  labels = np.arange(10, dtype=np.int32)
  prompts = [""] * 10

  def samples(scale):
    trainer = Trainer(_uncond(classifier_wd, scale), uncond_wd)
    ctx = trainer.model_context(trainer.load_for_inference())
    return trainer.task.generate(ctx, prompts, seed=3, labels=labels), ctx

  plain = Trainer(_uncond(), uncond_wd)
  unguided = plain.task.generate(plain.model_context(plain.load_for_inference()), prompts, seed=3, labels=labels)
  at_zero, _ = samples(0.0)
  np.testing.assert_allclose(at_zero, unguided, rtol=1e-5, atol=1e-5)  # the guide loaded, at scale 0, changes nothing
  guided, ctx = samples(30.0)
  assert not np.allclose(guided, unguided, atol=1e-3)

  # The classifier (at t = 0) gives the guided samples' labels a higher log-probability than the unguided ones'.
  model = ctx.merge()
  t0 = jnp.zeros((10,), jnp.int32)
  logp = lambda images: jax.nn.log_softmax(model.guide["classifier"](jnp.asarray(images), t0))[np.arange(10), labels]
  assert float(jnp.mean(logp(guided))) > float(jnp.mean(logp(unguided))) + 0.05


def test_guides_refuse_what_they_cannot_guide(guided_runs):
  classifier_wd, _ = guided_runs
  with pytest.raises(ConfigError, match="another noise schedule"):
    get_task(_uncond(classifier_wd, 1.0, **{"diffusion.schedule": "linear"}))
  with pytest.raises(ConfigError, match="sample.sampler: gradient guidance needs a sampler"):
    get_task(_uncond(classifier_wd, 1.0, **{"sample.sampler": "euler"}))
  with pytest.raises(ConfigError, match="classifier_guidance.scale is set but .workdir is empty"):
    get_task(_uncond("", 1.0))
  with pytest.raises(ConfigError, match="is a 'text_to_image_diffusion' run, not a 'noisy_classifier' run"):
    get_task(_uncond(guided_runs[1], 1.0))


def test_noisy_classifier_learns_and_its_evaluator_reports_each_time_step(guided_runs, tmp_path):
  config = classifier_config("tiny")
  config.train.update(steps=120, batch_size=32, log_every=40, eval_at_end=True)
  config.optim.update(lr=3e-3, warmup_steps=0)
  config.ema.enabled = False
  config.evals.noisy.update(timesteps=(0, 900), max_examples=64, batch_size=32)
  trainer = Trainer(config, str(tmp_path / "clf"))
  trainer.train()
  import json
  rows = [json.loads(line) for line in open(tmp_path / "clf" / "metrics.jsonl")]
  evals = [r for r in rows if "eval/noisy_accuracy" in r][-1]
  assert set(evals) >= {"eval/noisy_accuracy_t0", "eval/noisy_accuracy_t900", "eval/noisy_accuracy"}
  # 120 steps on 16 px digits, most of them noised beyond recognition: above chance (0.1; 0.27 when written) on
  # clean digits, better than at t = 900.
  assert evals["eval/noisy_accuracy_t0"] > 0.2, evals
  assert evals["eval/noisy_accuracy_t0"] > evals["eval/noisy_accuracy_t900"]


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
  from configs.mnist_clip import get_config as clip_config
  workdir = str(tmp_path_factory.mktemp("clip") / "run")
  saved_run(clip_config("tiny"), workdir)
  return workdir


def test_clip_guidance_raises_the_clip_score_and_digit_accuracy_reports_it(guided_runs, clip_run):
  from diffusion_jax.defaults import evaluator
  from diffusion_jax.evaluators.clip_scorer import ClipScorer
  from diffusion_jax.evaluators.digits import DigitAccuracy
  _, uncond_wd = guided_runs
  prompts = [f"a handwritten digit {d}" for d in ("zero", "one", "two", "three", "four", "five")]
  scorer = ClipScorer(clip_run, "clip")

  def samples(scale, cutouts=0):
    c = _uncond()
    c.sample.clip_guidance.update(workdir=clip_run, scale=scale, cutouts=cutouts)
    trainer = Trainer(c, uncond_wd)
    return trainer.task.generate(trainer.model_context(trainer.load_for_inference()), prompts, seed=5)

  unguided, guided = samples(0.0), samples(300.0)
  assert scorer.score(guided, prompts) > scorer.score(unguided, prompts) + 0.5
  assert np.all(np.isfinite(samples(300.0, cutouts=2)))

  # The evaluator's CLIP score is 100 × the floored cosine of the run's embeddings, computed here by hand.
  config = _uncond()
  spec = evaluator("digit_accuracy", per_class=1, clip_workdir=clip_run, frechet=False, diversity=False)
  trainer = Trainer(config, uncond_wd)
  ctx = trainer.model_context(trainer.load_for_inference())
  got = DigitAccuracy("digits", trainer.task, config, spec).run(ctx)
  prompts, labels = trainer.task.label_prompts(1)
  images = trainer.task.generate(ctx, prompts, spec.seed, labels=labels)
  image = scorer.image_embeddings(images)
  text = scorer.text_embeddings(prompts)
  cos = np.sum(image * text, 1) / np.linalg.norm(image, axis=1) / np.linalg.norm(text, axis=1)
  np.testing.assert_allclose(got["digit_accuracy_clip_score"], np.mean(100 * np.maximum(cos, 0)), rtol=1e-4)
