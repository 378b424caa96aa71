"""Latent diffusion (configs/mnist_ldm.py): a U-Net on a frozen VAE's latents, prompts through a frozen CLIP text
tower, latents cached to ArrayRecord once. The VAE and CLIP "runs" are checkpoints of their random initialisation made
here; the data is 192 MNIST digits in an ArrayRecord file, so the cache is written in seconds."""
import os
import shutil

import jax
import numpy as np
import pytest

from configs import mnist_clip, mnist_ldm, mnist_vae
from diffusion_jax.config import ConfigError
from diffusion_jax.data import mnist, records
from diffusion_jax.data import latent_cache
from diffusion_jax.tasks.diffusion import DiffusionTask
from diffusion_jax.tasks.latent import identity
from diffusion_jax.train import parts
from diffusion_jax.train.evaluators import make_evaluators
from diffusion_jax.train.task import get_task
from diffusion_jax.train.metrics_writer import read_metrics
from diffusion_jax.train.trainer import Trainer
from tests.runs import saved_run

TRAIN, TEST = 192, 64


def _quiet(config):
  config.train.update(eval_at_end=False, sample_at_end=False, progress_bar=False)
  config.mesh.shape = (1, 1, 1)  # one device: what is tested here does not depend on the mesh, and it compiles faster
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """MNIST digits as ArrayRecord files, and randomly initialised VAE and CLIP runs."""
  root = tmp_path_factory.mktemp("ldm")
  images, labels = mnist.load_mnist("test")
  for split, rows in (("train", range(TRAIN)), ("test", range(TRAIN, TRAIN + TEST))):
    records.write_array_record(str(root / f"{split}.array_record"), (
        records.encode_record(images[i], "", int(labels[i])) for i in rows))
  data = dict(source="array_record", path=str(root / "{split}.array_record"))
  vae = _quiet(mnist_vae.get_config("tiny"))
  vae.data.update(data, image_size=16)
  clip = _quiet(mnist_clip.get_config("tiny"))
  clip.data.update(data)
  return {"root": root, "data": data, "vae": saved_run(vae, str(root / "vae")).workdir,
          "clip": saved_run(clip, str(root / "clip")).workdir}


def _config(runs, *, cache=True, clip=True):
  c = _quiet(mnist_ldm.get_config("tiny"))
  c.data.update(runs["data"])
  # Two shards of 128; the scale from the whole set either way, so the cached and on-the-fly runs agree.
  c.latent.update(vae_workdir=runs["vae"], cache=cache, cache_batch_size=64, shard_size=128, scale_examples=TRAIN)
  c.text.clip_workdir = runs["clip"] if clip else ""
  c.model.conditioners = ("clip_text",) if clip else ("text",)
  c.train.update(steps=1, log_every=1, checkpoint_every=1)
  return c


class _SaysZero:
  """A stand-in digit classifier: every image is a 0, so each prompt set scores exactly 1/10."""

  def predict(self, images):
    return np.zeros(len(images), np.int64)


def _start(trainer):
  """The trainer's state as a run starts it (weight sources applied) and the model context of it."""
  ckpt = trainer.checkpointer()
  state, _ = trainer.restore_or_init(ckpt)
  ckpt.close()
  return state, trainer.model_context(state)


def test_cache_is_written_once_and_gives_the_in_step_latents(runs, tmp_path, monkeypatch):
  cached_wd = str(tmp_path / "cached")
  trainer = Trainer(_config(runs), cached_wd)
  trainer.train()
  task = trainer.task
  assert task.latents.shape == (8, 8, 4)  # 16 px through the tiny VAE's x2 downsampling, 4 latent channels
  assert task.latents.images_encoded == TRAIN  # each training image once, the scale taken from the cache
  cache = os.path.join(cached_wd, "latent_cache")
  meta = latent_cache.read_meta(cache)
  assert meta["complete"] and meta["examples"] == TRAIN and [s["examples"] for s in meta["shards"]] == [128, 64]
  # The scale is 1/std of the posterior means of every training image.
  state, ctx = _start(trainer)
  pixels = next(iter(task_pixels(task, TRAIN)))
  means = task.latents.encoder(ctx, text=False)(pixels)["latent"]
  scale = task.latents.scale
  np.testing.assert_allclose(scale, 1 / np.std(means), rtol=1e-4)
  row = latent_cache.CacheSource(latent_cache.shard_paths(cache, meta), scale, 0.0)[5]
  np.testing.assert_allclose(row["latents"], means[5] * scale, rtol=1e-4, atol=1e-5)
  assert row["text_states"].shape == (16, task.text_dims()[0])

  # A resumed run reads the cache: no image goes through the encoder outside the step, no shard is rewritten.
  mtimes = {f: os.path.getmtime(os.path.join(cache, f)) for f in os.listdir(cache)}
  # It also evaluates and samples at its end, where the frozen VAE and text tower run under the trainer's mesh, and
  # prompts with the held-out phrasings too.
  from diffusion_jax.eval import digit_classifier
  monkeypatch.setattr(digit_classifier, "load_or_train", lambda *a, **k: _SaysZero())
  prompted = []
  generate = DiffusionTask.generate
  monkeypatch.setattr(DiffusionTask, "generate",
                      lambda self, ctx, prompts, *a, **k: prompted.append(list(prompts)) or generate(
                          self, ctx, prompts, *a, **k))
  config = _config(runs)
  config.train.update(steps=2, eval_at_end=True, sample_at_end=True)
  for name in ("digits", "digits_heldout"):
    config.evals[name].update(every=0, per_class=1, frechet=False, diversity=False)
  resumed = Trainer(config, cached_wd)
  resumed.train()
  assert [p[:2] for p in prompted] == [["a handwritten digit zero", "a handwritten digit one"],
                                       ["a photo of the number zero", "a photo of the number one"],
                                       ["zero", "one"], ["a photo of the number zero", "a photo of the number one"]]
  final = [r for r in read_metrics(cached_wd) if "eval/loss" in r][-1]
  assert final["step"] == 2 and np.isfinite(final["eval/loss"])
  for key in ("eval/digit_accuracy", "eval/digit_accuracy_heldout", "eval/digit_accuracy_heldout_1"):
    assert final[key] == pytest.approx(0.1)
  samples = os.path.join(cached_wd, "samples", "step_2")
  with open(os.path.join(samples, "index.jsonl")) as f:
    assert "a photo of the number nine" in f.read()
  assert os.path.exists(os.path.join(samples, "grid.png"))
  # Training read the cache; the evaluation's loss batches were encoded inside its own program.
  assert resumed.task.latents.images_encoded == 0
  assert {f: os.path.getmtime(os.path.join(cache, f)) for f in os.listdir(cache)} == mtimes
  assert [r["step"] for r in read_metrics(cached_wd) if "train/loss" in r] == [1, 2]

  # An encode interrupted after its first shard resumes at the second, and writes the same records.
  partial = str(tmp_path / "partial")
  shutil.copytree(cache, partial)
  meta["shards"], meta["complete"] = meta["shards"][:1], False
  latent_cache.write_json(os.path.join(partial, latent_cache.META_FILE), meta)
  os.remove(os.path.join(partial, "latents-00001.array_record"))
  state, ctx = _start(resumed)
  latents_ = resumed.task.latents
  latents_.images_encoded = 0
  latent_cache.ensure_cache(partial, latents_.cache_settings(identity(resumed.task.text_source)), config.data,
                            encode=latents_.encoder(ctx, text=True), batch_size=64, shard_size=128, seed=0)
  assert latents_.images_encoded == TRAIN - 128
  with open(os.path.join(cache, "latents-00001.array_record"), "rb") as a, \
       open(os.path.join(partial, "latents-00001.array_record"), "rb") as b:
    assert a.read() == b.read()

  # Without the cache the step encodes pixel batches itself: the same examples in the same order (the same shuffle
  # over the same source order), hence the same loss with the same rng.
  fly_config = _config(runs, cache=False)
  fly = get_task(fly_config)
  fly.latents.scale = resumed.task.latents.scale
  cached_batch = next(iter(resumed.task.train_dataset(ctx, global_batch_size=8, seed=0)))
  fly_batch = next(iter(fly.train_dataset(ctx, global_batch_size=8, seed=0)))
  np.testing.assert_array_equal(cached_batch["label"], fly_batch["label"])
  assert "latents" in cached_batch and "latents" not in fly_batch and "text_states" not in fly_batch
  rng = jax.random.fold_in(jax.random.key(0), 0)  # the trainer's rng for a step 0
  loss = lambda task: ctx.jit(lambda model, batch: task.loss(model, batch, rng)[0], key=(task, "test_loss"))
  np.testing.assert_allclose(loss(fly)(fly_batch), loss(resumed.task)(cached_batch), rtol=1e-5)

  # Samples are decoded to pixels; the negative prompt is what guidance pushes away from.
  plain = resumed.task.generate(ctx, ["a handwritten digit one"] * 2, seed=0)
  negative = resumed.task.generate(ctx, ["a handwritten digit one"] * 2, seed=0, negative_prompt="seven")
  assert plain.shape == (2, 16, 16, 1) and np.all(np.abs(plain) <= 1)
  assert not np.allclose(plain, negative)

  # The trained state holds the U-Net alone; the VAE and the text tower are frozen parts, equal to their runs'.
  assert {n.split(".")[0] for n in parts.flat_names(state.params["main"])} == {"denoiser"}
  frozen = parts.flat_names(resumed.frozen)
  assert {n.split(".")[0] for n in frozen} == {"vae", "conditioners"}
  vae_trainer = Trainer(_quiet(mnist_vae.get_config("tiny")), runs["vae"])
  vae_params = parts.flat_names(vae_trainer.load_for_inference().ema["vae"])
  for name, value in vae_params.items():
    np.testing.assert_array_equal(np.asarray(frozen[name]), np.asarray(value))

  # A cache made with other settings is refused in one line, before the run initialises or compiles anything.
  other = _config(runs, clip=False)
  other.latent.cache_dir = cache
  refused = Trainer(other, str(tmp_path / "other"))
  with pytest.raises(ConfigError, match=r"other settings \(text_tower\)"):
    refused.train()
  assert refused.frozen is None and not os.path.exists(os.path.join(refused.workdir, "checkpoints"))


def task_pixels(task, n):
  from diffusion_jax.data import pipeline
  d = task.config.data
  return pipeline.make_dataset(d, d.train_split, global_batch_size=n, seed=0, shuffle=False, repeat=False)


def test_a_diffusers_vae_folder_and_a_given_scale(runs, tmp_path):
  from flax import nnx
  from diffusion_jax.models.vae import AutoencoderKL, vae_config
  from diffusion_jax.pretrained import weights
  from diffusion_jax.pretrained.vae import save_diffusers_vae
  folder = str(tmp_path / "vae")
  vae = AutoencoderKL(vae_config("tiny", in_channels=1, out_channels=1), rngs=nnx.Rngs(0))
  save_diffusers_vae(vae, folder)
  config = _config(runs, cache=False, clip=False)
  config.latent.update(vae_workdir="", vae_pretrained=folder, scaling_factor=0.5)
  trainer = Trainer(config, str(tmp_path / "run"))
  state, ctx = _start(trainer)
  task = trainer.task
  task.prepare(ctx, training=True)
  assert not os.path.exists(str(tmp_path / "run" / "latent_scale.json"))  # a given scale is not estimated
  frozen = parts.flat_names(trainer.frozen)
  for name, value in weights.model_arrays(vae).items():
    np.testing.assert_array_equal(np.asarray(frozen[f"vae.{name}"]), value)
  batch = next(iter(task.train_dataset(ctx, global_batch_size=8, seed=0)))
  latents = ctx.jit(task.clean_sample)(batch)
  means = np.asarray(ctx.jit(lambda model, x: model.vae.encode(x).mean)(batch["image"]))
  assert latents.shape == (8, 8, 8, 4)
  np.testing.assert_allclose(np.asarray(latents), means * 0.5, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    (dict(vae_pretrained="/x"), "not both"),
    (dict(vae_workdir="", cache=True), "needs a VAE"),
    (dict(vae_workdir="/nonexistent"), "holds no checkpoints"),
])
def test_latent_config_errors(runs, change, message):
  config = _config(runs)
  config.latent.update(change)
  with pytest.raises(ConfigError, match=message):
    get_task(config)


def test_heldout_templates_must_be_held_out(runs):
  config = _config(runs)
  config.evals.digits_heldout.templates = ("{name}", "a handwritten digit {name}")
  with pytest.raises(ConfigError, match="'a handwritten digit {name}' is one of data.caption_templates"):
    make_evaluators(get_task(config), config)


def test_text_tower_must_match_the_tokenizer(runs):
  config = _config(runs)
  config.data.max_text_len = 12
  with pytest.raises(ConfigError, match="must match the text tower"):
    get_task(config)
  config = _config(runs)
  config.text.clip_workdir = runs["vae"]
  with pytest.raises(ConfigError, match="not a 'contrastive' run"):
    get_task(config)


def test_two_processes_share_one_cache(runs, tmp_path):
  """2 JAX processes × 2 CPU devices through launch/local_multiprocess.sh: each restores the frozen VAE and text
  tower onto the 4-device mesh, both run the (sharded) encoder over the training split and process 0 alone writes
  and reports the cache, then both train on it."""
  from tests.test_multiprocess import LAUNCHER, _env, _free_port, _Launch
  workdir, logs = str(tmp_path / "run"), tmp_path / "logs"
  overrides = [f"--config.data.source={runs['data']['source']}", f"--config.data.path={runs['data']['path']}",
               f"--config.latent.vae_workdir={runs['vae']}", f"--config.text.clip_workdir={runs['clip']}",
               "--config.latent.cache_batch_size=64", f"--config.latent.scale_examples={TRAIN}",
               "--config.train.steps=1", "--config.train.progress_bar=False"]
  env = _env(PORT=str(_free_port()), LOG_DIR=str(logs))
  first = _Launch(["bash", LAUNCHER, "2", "2", "--config", "configs/mnist_ldm.py:tiny", "--workdir", workdir,
                   *overrides], env, str(tmp_path / "launch.log")).result()
  with open(logs / "process_1.log") as f:
    second = f.read()
  assert f"encoding {TRAIN} training images" in first and "encoding" not in second
  meta = latent_cache.read_meta(os.path.join(workdir, "latent_cache"))
  assert meta["complete"] and meta["examples"] == TRAIN
  assert [r["step"] for r in read_metrics(workdir) if "train/loss" in r] == [1]
