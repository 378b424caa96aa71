"""Concept fine-tuning (DreamBooth with LoRA, configs/mnist_concept.py) on a finished latent text-to-image run. The
VAE, CLIP and base "runs" are checkpoints of their random initialisation; the subject is the bundled stars."""
import json
import os
import shutil

import numpy as np
import pytest

from configs import mnist_clip, mnist_concept, mnist_ldm, mnist_vae
from diffusion_jax.config import ConfigError
from diffusion_jax.data import mnist
from diffusion_jax.data.records import DataError
from diffusion_jax.evaluators import concept as concept_eval
from diffusion_jax.tasks import concept as concept_task
from diffusion_jax.tasks.latent import SCALE_FILE, identity
from diffusion_jax.train import parts
from diffusion_jax.train.evaluators import make_evaluators
from diffusion_jax.train.task import get_task
from diffusion_jax.train.trainer import Trainer
from tests.runs import saved_run

SCALE = 0.777  # the base run's recorded latent scale: the concept run must use it, not estimate its own


def _quiet(config):
  config.train.update(eval_at_end=False, sample_at_end=False, progress_bar=False)
  config.mesh.shape = (1, 1, 1)
  return config


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  root = tmp_path_factory.mktemp("concept")
  vae = saved_run(_quiet(mnist_vae.get_config("tiny")), str(root / "vae")).workdir
  clip = saved_run(_quiet(mnist_clip.get_config("tiny")), str(root / "clip")).workdir
  ldm = _quiet(mnist_ldm.get_config("tiny"))
  ldm.latent.update(vae_workdir=vae, cache=False)
  ldm.text.clip_workdir = clip
  ldm_run = saved_run(ldm, str(root / "ldm"))
  with open(os.path.join(ldm_run.workdir, SCALE_FILE), "w") as f:
    json.dump({"scaling_factor": SCALE, "latent_std": 1 / SCALE, "values": 1,
               "vae": identity(ldm_run.task.latents.source)}, f)
  return {"vae": vae, "clip": clip, "ldm": ldm_run.workdir}


def _config(base, **concept):
  c = _quiet(mnist_concept.get_config("tiny"))
  c.latent.vae_workdir, c.text.clip_workdir, c.lora.base_workdir = base["vae"], base["clip"], base["ldm"]
  c.concept.update(concept)
  return c


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
  """A finished two-step concept run: (config, trainer, final state)."""
  c = _config(base)
  trainer = Trainer(c, str(tmp_path_factory.mktemp("star") / "run"))
  return c, trainer, trainer.train()


def test_concept_run_trains_adapters_on_stars_and_the_prior_and_writes_a_diffusers_lora(base, trained):
  from diffusion_jax.pretrained.lora import load_diffusers_lora
  c, trainer, state = trained
  run = trainer.workdir
  task = trainer.task
  assert int(state.step) == 2 and task.latents.scale == SCALE
  # Half the rows are the five stars under the prompt (weight 1), half the base model's six digit samples.
  rows, stars = task.rows, task.concept_images()
  assert len(stars) == 5 and stars.shape[1:] == (c.data.image_size, c.data.image_size, 1)
  n = len(rows["weight"]) - 6
  np.testing.assert_array_equal(rows["image"][:n], np.tile(stars, (n // 5, 1, 1, 1)))
  np.testing.assert_array_equal(rows["weight"], np.r_[np.ones(n), np.full(6, c.concept.prior_loss_weight)])
  np.testing.assert_array_equal(rows["label"][n:], np.arange(6) % 10)
  prompt_tokens = task.prompt_inputs([c.concept.prompt])["tokens"][0]
  assert (rows["tokens"][:n] == prompt_tokens).all() and not (rows["tokens"][n:] == prompt_tokens).all(-1).any()
  with np.load(os.path.join(run, concept_task.CLASS_FILE)) as f:
    np.testing.assert_array_equal(f["image"], rows["image"][n:])
  assert len([p for p in os.listdir(os.path.join(run, "class_images")) if p.endswith(".png")]) >= 6
  # Only the adapters trained: they are everything in the run's parameters, and all of them are in the U-Net.
  names = parts.flat_names(state.params["main"])
  assert names and all(".lora." in k and k.startswith("denoiser.unet.") for k in names)
  # The 'attention' preset: every projection of both attentions, not the feed-forward's output layer.
  assert {k.split(".lora.")[0].rsplit(".", 2)[-2:][0] for k in names} == {"attn1", "attn2"}
  assert {k.split(".lora.")[0].rsplit(".", 1)[-1] for k in names} == {"query", "key", "value", "out"}
  assert any(np.abs(np.asarray(v)).max() > 0 for k, v in names.items() if k.endswith(".b"))

  info = trainer.sample()
  adapted = {k[: -len(".lora.b")] for k in names if k.endswith(".lora.b")}
  fresh = Trainer(_base_config(base), base["ldm"])
  unet = fresh.model_context(fresh.load_for_inference()).merge().denoiser.unet
  loaded = load_diffusers_lora(unet, info["lora_file"])
  assert {f"denoiser.unet.{n}" for n in loaded} == adapted
  ours = {k: np.asarray(v) for k, v in names.items()}
  for name in loaded:
    layer = _module(unet, name)
    b = np.asarray(layer.lora.b[...]) * layer.lora.scale
    want = ours[f"denoiser.unet.{name}.lora.b"] * c.lora.alpha / c.lora.rank
    np.testing.assert_allclose(b, want, rtol=1e-6, atol=1e-7)


def _base_config(base):
  ldm = _quiet(mnist_ldm.get_config("tiny"))
  ldm.latent.update(vae_workdir=base["vae"], cache=False)
  ldm.text.clip_workdir = base["clip"]
  return ldm


def _module(root, dotted):
  for part in dotted.split("."):
    root = root[int(part)] if part.isdigit() else getattr(root, part)
  return root


def test_class_images_are_drawn_once_and_guarded(base, trained, tmp_path):
  shutil.copytree(trained[1].workdir, tmp_path / "run", ignore=shutil.ignore_patterns(".lock"))
  c = _config(base)
  # Another prior is refused rather than mixed with the one on disk.
  c2 = _config(base, num_class_images=8)
  c2.train.steps = 4
  with pytest.raises(ConfigError, match=r"other settings \(num_class_images\)"):
    Trainer(c2, str(tmp_path / "run")).train()
  # Past step 0 the model is no longer the base, so a lost file is not redrawn.
  os.remove(tmp_path / "run" / concept_task.CLASS_FILE)
  c.train.steps = 4
  with pytest.raises(ConfigError, match="is missing although this run is at step 2"):
    Trainer(c, str(tmp_path / "run")).train()


@pytest.mark.parametrize("change, error, message", [
    (dict(prompt="a handwritten digit three"), ConfigError, "every token of it is one the training captions use"),
    (dict(prompt=""), ConfigError, "needs concept.prompt"),
    (dict(images="/nonexistent"), DataError, "is not a folder"),
])
def test_concept_config_errors(base, tmp_path, change, error, message):
  with pytest.raises(error, match=message):
    get_task(_config(base, **change)).check_run()


class _PixelJudge:
  """A stand-in for the digit classifier: 4 × 4 average-pooled pixels as features."""

  def features(self, images):
    x = np.asarray(images, np.float32)
    h = x.shape[1] // 4 * 4
    return x[:, :h, :h, 0].reshape(len(x), 4, h // 4, 4, h // 4).mean((2, 4)).reshape(len(x), 16)

  def test_features(self):
    images, labels = mnist.load_mnist("test")
    return self.features(images[..., None].astype(np.float32) / 127.5 - 1), np.asarray(labels)


def test_concept_evaluator_by_its_definitions(base, monkeypatch):
  a, b = np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[1.0, 1.0]])
  assert concept_eval.similarity(a, b) == pytest.approx(np.sqrt(0.5))
  np.testing.assert_array_equal(concept_eval.nearest(np.array([[0.0, 0.1], [5.0, 5.0]]), np.array([[0, 0], [4, 4]])),
                                [0, 1])
  judge = _PixelJudge()
  monkeypatch.setattr(concept_eval.digit_classifier, "load_or_train", lambda *a, **k: judge)
  c = _config(base)
  task = get_task(c)
  evaluator = make_evaluators(task, c)["concept"]
  stars = task.concept_images()
  monkeypatch.setattr(task, "generate", lambda ctx, prompts, seed, **k: stars[np.arange(len(prompts)) % 5])
  got = evaluator.run(None)
  subject = judge.features(stars)
  unit = subject / np.linalg.norm(subject, axis=-1, keepdims=True)
  assert got["concept_rate"] == 1.0  # the subject's own images are judged the subject
  assert got["concept_similarity"] == pytest.approx(np.mean(unit[np.arange(100) % 5] @ unit.T), rel=1e-5)
  assert got["concept_similarity_subject"] == pytest.approx((unit @ unit.T)[np.triu_indices(5, 1)].mean())
  test, labels = judge.test_features()
  centroids = np.stack([test[labels == d].mean(0) for d in range(10)] + [subject.mean(0)])
  far = ((test[:1000, None] - centroids[None]) ** 2).sum(-1).argmin(-1) == 10
  assert got["concept_rate_digits"] == pytest.approx(far.mean())
  digits = test[:1000] / np.linalg.norm(test[:1000], axis=-1, keepdims=True)
  assert got["concept_similarity_digits"] == pytest.approx(np.mean(digits @ unit.T), rel=1e-5)
