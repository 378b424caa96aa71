"""Latent diffusion (configs/mnist_ldm.py): a U-Net on a frozen VAE's latents, prompts through a frozen CLIP text
tower, latents cached to ArrayRecord once. The VAE and CLIP "runs" are checkpoints of their random initialisation made
here; the data is 192 MNIST digits in an ArrayRecord file, so the cache is written in seconds."""
import os

import jax
import numpy as np
import pytest

from configs import mnist_clip, mnist_ldm, mnist_vae
from diffusion_jax.config import ConfigError
from diffusion_jax.data import mnist, records
from diffusion_jax.tasks import latents
from diffusion_jax.tasks.base import get_task
from diffusion_jax.train.metrics_writer import read_metrics
from diffusion_jax.train.trainer import Trainer

TRAIN, TEST = 192, 64


def _quiet(config):
  config.train.update(eval_at_end=False, sample_at_end=False, progress_bar=False)
  config.mesh.shape = (1, 1, 1)  # one device: what is tested here does not depend on the mesh, and it compiles faster
  return config


def _saved_run(config, workdir):
  """A 'finished run' at its random initialisation: a checkpoint with its config, without compiling a train step."""
  trainer = Trainer(config, workdir)
  ckpt = trainer.checkpointer()
  ckpt.save(0, trainer.init_state(), data_state=None, config_json=config.to_json_best_effort(), wait=True)
  ckpt.close()
  return workdir


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
  return {"root": root, "data": data, "vae": _saved_run(vae, str(root / "vae")),
          "clip": _saved_run(clip, str(root / "clip"))}


def _config(runs, *, cache=True, clip=True):
  c = _quiet(mnist_ldm.get_config("tiny"))
  c.data.update(runs["data"])
  # Two shards of 128; the scale from the whole set either way, so the cached and on-the-fly runs agree.
  c.latent.update(vae_workdir=runs["vae"], cache=cache, cache_batch_size=64, shard_size=128, scale_examples=TRAIN)
  c.text.clip_workdir = runs["clip"] if clip else ""
  c.train.update(steps=1, log_every=1, checkpoint_every=1)
  return c


class _SaysZero:
  """A stand-in digit classifier: every image is a 0, so each prompt set scores exactly 1/10."""

  def predict(self, images):
    return np.zeros(len(images), np.int64)


def test_cache_is_written_once_and_gives_the_on_the_fly_batches(runs, tmp_path, monkeypatch):
  cached_wd = str(tmp_path / "cached")
  trainer = Trainer(_config(runs), cached_wd)
  trainer.train()
  task = trainer.task
  assert task.latents.shape == (8, 8, 4)  # 16 px through the tiny VAE's x2 downsampling, 4 latent channels
  assert task.latents.images_encoded == TRAIN  # each training image once, the scale taken from the cache
  cache = os.path.join(cached_wd, "latent_cache")
  meta = latents._read_meta(cache)
  assert meta["complete"] and meta["examples"] == TRAIN and [s["examples"] for s in meta["shards"]] == [128, 64]
  # The scale is 1/std of the posterior means of every training image.
  pixels = next(iter(task_pixels(task, TRAIN)))
  means = task.latents.encode(pixels["image"])
  scale = task.latents.scale(cached_wd)
  np.testing.assert_allclose(scale, 1 / np.std(means), rtol=1e-4)
  row = latents.CacheSource([os.path.join(cache, s["file"]) for s in meta["shards"]], scale, 0.0)[5]
  np.testing.assert_allclose(row["image"], means[5] * scale, rtol=1e-4, atol=1e-5)
  assert row["text_states"].shape == (16, task.text_tower.width)

  # A resumed run reads the cache: no image goes through the encoder again, no shard is rewritten.
  mtimes = {f: os.path.getmtime(os.path.join(cache, f)) for f in os.listdir(cache)}
  # It also evaluates and samples at its end, where the frozen VAE and text tower run under the trainer's mesh, and
  # prompts with the held-out phrasings too.
  from diffusion_jax.eval import digit_classifier
  from diffusion_jax.tasks.diffusion import TextToImageDiffusion
  monkeypatch.setattr(digit_classifier, "load_or_train", lambda *a, **k: _SaysZero())
  prompted = []
  generate = TextToImageDiffusion.generate
  monkeypatch.setattr(TextToImageDiffusion, "generate",
                      lambda self, ctx, prompts, *a, **k: prompted.append(list(prompts)) or generate(
                          self, ctx, prompts, *a, **k))
  config = _config(runs)
  config.train.update(steps=2, eval_at_end=True, sample_at_end=True)
  config.eval.digit_accuracy_samples_per_class = 1
  resumed = Trainer(config, cached_wd)
  resumed.train()
  assert [p[:2] for p in prompted] == [["a handwritten digit zero", "a handwritten digit one"],
                                       ["a photo of the number zero", "a photo of the number one"],
                                       ["zero", "one"], ["a photo of the number zero", "a photo of the number one"]]
  final = read_metrics(cached_wd)[-1]
  assert final["step"] == 2 and np.isfinite(final["eval/loss"])
  for key in ("eval/digit_accuracy", "eval/digit_accuracy_heldout", "eval/digit_accuracy_heldout_1"):
    assert final[key] == pytest.approx(0.1)
  samples = os.path.join(cached_wd, "samples", "step_2")
  with open(os.path.join(samples, "index.jsonl")) as f:
    assert "a photo of the number nine" in f.read()
  assert os.path.exists(os.path.join(samples, "grid.png"))
  # Training read the cache; only the one eval-loss batch went through the encoder.
  assert resumed.task.latents.images_encoded == config.eval.batch_size * config.eval.loss_batches
  assert {f: os.path.getmtime(os.path.join(cache, f)) for f in os.listdir(cache)} == mtimes
  assert [r["step"] for r in read_metrics(cached_wd) if "train/loss" in r] == [1, 2]

  # An encode interrupted after its first shard resumes at the second, and writes the same records.
  import shutil
  partial = str(tmp_path / "partial")
  shutil.copytree(cache, partial)
  meta["shards"], meta["complete"] = meta["shards"][:1], False
  latents._write_json(os.path.join(partial, latents.META_FILE), meta)
  os.remove(os.path.join(partial, "latents-00001.array_record"))
  resumed.task.latents.images_encoded = 0
  resumed.task.latents.ensure_cache(partial, 0, resumed.task.text_tower)
  assert resumed.task.latents.images_encoded == TRAIN - 128
  with open(os.path.join(cache, "latents-00001.array_record"), "rb") as a, \
       open(os.path.join(partial, "latents-00001.array_record"), "rb") as b:
    assert a.read() == b.read()

  # Encoding every batch on the fly gives the same batches (the same shuffle over the same source order), hence the
  # same first-step loss with the same rng.
  fly = get_task(_config(runs, cache=False))
  batches = [next(iter(t.train_dataset(wd, global_batch_size=8, seed=0, process_index=0, process_count=1)))
             for t, wd in ((resumed.task, cached_wd), (fly, str(tmp_path / "fly")))]
  np.testing.assert_array_equal(batches[0]["label"], batches[1]["label"])
  np.testing.assert_allclose(batches[0]["image"], batches[1]["image"], rtol=1e-5, atol=1e-6)
  ctx = resumed.model_context(resumed.load_for_inference())
  rng = jax.random.fold_in(jax.random.key(0), 0)  # the trainer's rng for a step 0
  loss = ctx.jit_apply(lambda model, batch: resumed.task.loss(model, batch, rng)[0])
  np.testing.assert_allclose(loss(batches[1]), loss(batches[0]), rtol=1e-5)

  # Samples are decoded to pixels; the negative prompt is what guidance pushes away from.
  with jax.set_mesh(resumed.mesh):
    plain = resumed.task.generate(ctx, ["a handwritten digit one"] * 2, seed=0)
    negative = resumed.task.generate(ctx, ["a handwritten digit one"] * 2, seed=0, negative_prompt="seven")
  assert plain.shape == (2, 16, 16, 1) and np.all(np.abs(plain) <= 1)
  assert not np.allclose(plain, negative)

  # The trained state holds the U-Net alone: the VAE and the text tower stay outside it, unchanged.
  assert set(resumed.abstract_state.params.to_pure_dict()) == {"unet"}
  vae_trainer = Trainer(_quiet(mnist_vae.get_config("tiny")), runs["vae"])
  vae_params = vae_trainer.model_context(vae_trainer.load_for_inference()).params.to_pure_dict()["vae"]
  frozen_params = resumed.task.latents._vae().state.to_pure_dict()
  for a, b in zip(jax.tree.leaves(frozen_params), jax.tree.leaves(vae_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # A cache made with other settings is refused in one line.
  other = _config(runs, clip=False)
  with pytest.raises(ConfigError, match=r"other settings \(text_tower\)"):
    Trainer(other, cached_wd).train()


def task_pixels(task, n):
  from diffusion_jax.data import pipeline
  d = task.config.data
  return pipeline.make_dataset(d, d.train_split, global_batch_size=n, seed=0, shuffle=False, repeat=False)


def test_a_diffusers_vae_folder_and_a_given_scale(runs, tmp_path):
  from flax import nnx
  from diffusion_jax.models.vae import AutoencoderKL, vae_config
  from diffusion_jax.pretrained.vae import save_diffusers_vae
  folder = str(tmp_path / "vae")
  save_diffusers_vae(AutoencoderKL(vae_config("tiny", in_channels=1, out_channels=1), rngs=nnx.Rngs(0)), folder)
  config = _config(runs, cache=False, clip=False)
  config.latent.update(vae_workdir="", vae_pretrained=folder, scaling_factor=0.5)
  task = get_task(config)
  batch = next(iter(task.train_dataset(str(tmp_path / "run"), global_batch_size=8, seed=0, process_index=0,
                                       process_count=1)))
  assert batch["image"].shape == (8, 8, 8, 4) and "text_states" not in batch
  assert not os.path.exists(str(tmp_path / "run" / latents.SCALE_FILE))  # a given scale is not estimated


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
  config.eval.heldout_templates = ("{name}", "a handwritten digit {name}")
  with pytest.raises(ConfigError, match="'a handwritten digit {name}' is one of data.caption_templates"):
    get_task(config)


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
  tower, process 0 alone encodes the training split while process 1 waits at the barrier, then both train on it."""
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
  meta = latents._read_meta(os.path.join(workdir, "latent_cache"))
  assert meta["complete"] and meta["examples"] == TRAIN
  assert [r["step"] for r in read_metrics(workdir) if "train/loss" in r] == [1]
