"""CLIP training as a task on the shared trainer: the CLI run with zero-shot and retrieval metrics, the same
losses on 1 and 8 devices, a locked image tower, and starting from a transformers CLIP folder."""
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx

from configs.mnist_clip import get_config
from diffusion_jax import pretrained
from diffusion_jax.config import ConfigError
from diffusion_jax.models.clip import CLIPModel
from diffusion_jax.pretrained import weights
from diffusion_jax.pretrained.clip import save_transformers
from diffusion_jax.tasks.contrastive import clip_config
from diffusion_jax.data import tokenizers
from diffusion_jax.train.metrics_writer import read_metrics
from diffusion_jax.train.trainer import Trainer
from tests.test_cli import run_cli


def _tiny(arg="tiny", steps=3):
  c = get_config(arg)
  c.train.update(steps=steps, log_every=1, checkpoint_every=100, eval_at_end=False)
  return c


def _params(trainer, state) -> dict[str, np.ndarray]:
  """Every parameter of the model (trained and frozen) by name."""
  model = trainer.partition.merge(trainer.graphdef, trainer.frozen, state.params, state.mutable)
  return weights.model_arrays(model)


def test_cli_trains_and_logs_zero_shot_and_retrieval(tmp_path):
  wd = str(tmp_path / "run")
  proc = run_cli("--config", "configs/mnist_clip.py:tiny", "--workdir", wd)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = read_metrics(wd)
  train = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train] == [2, 4]
  assert all(np.isfinite(r["train/loss"]) and r["train/loss"] > 0 for r in train)
  assert abs(train[0]["train/logit_scale"] - 1 / 0.07) < 0.1  # CLIP's initial temperature
  (ev,) = [r for r in rows if "eval/zero_shot_top1" in r]
  assert ev["step"] == 4 and ev["eval/examples"] == 128
  for key in ("zero_shot_top1", "zero_shot_top5", "image_to_text_r1", "image_to_text_r5", "image_to_text_r10",
              "text_to_image_r1", "text_to_image_r10"):
    assert 0.0 <= ev[f"eval/{key}"] <= 1.0, key
  assert ev["eval/zero_shot_top5"] >= ev["eval/zero_shot_top1"]
  # 10 digits x 5 templates: captions repeat, so retrieval is over the distinct ones.
  assert ev["eval/distinct_captions"] <= 50

  proc = run_cli("--config", "configs/mnist_clip.py:tiny", "--workdir", wd, "--mode=eval")
  assert proc.returncode == 0, proc.stderr[-3000:]
  again = [r for r in read_metrics(wd) if "eval/zero_shot_top1" in r]
  assert len(again) == 2 and again[1]["eval/zero_shot_top1"] == ev["eval/zero_shot_top1"]


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_loss_is_global_so_one_and_eight_devices_agree(tmp_path, loss):
  losses = {}
  for devices in (1, 8):
    c = _tiny("siglip,tiny" if loss == "siglip" else "tiny")
    c.mesh.shape = (devices, 1, 1)
    wd = str(tmp_path / f"d{devices}")
    Trainer(c, wd).train()
    losses[devices] = [(r["train/loss"], r.get("train/logit_bias", 0.0)) for r in read_metrics(wd)
                       if "train/loss" in r]
  assert len(losses[1]) == 3
  np.testing.assert_allclose(losses[8], losses[1], rtol=2e-5)
  if loss == "siglip":  # the sigmoid loss starts at its bias -10: log(1 + e^-10) per negative pair ≈ 0
    assert losses[1][0][1] == pytest.approx(-10.0, abs=0.01)


def _export_tiny_clip(folder, seed=123):
  """A transformers-layout CLIP folder whose towers fit the tiny MNIST config with the CLIP tokenizer."""
  c = _tiny()
  c.data.tokenizer, c.data.max_text_len = "clip", 16
  cfg = clip_config(c, tokenizers.get_tokenizer("clip"))
  model = CLIPModel(cfg, rngs=nnx.Rngs(seed))
  save_transformers(model, folder)
  return weights.model_arrays(model)


def test_init_from_a_transformers_folder_and_lock_the_image_tower(tmp_path):
  folder = str(tmp_path / "clip")
  saved = _export_tiny_clip(folder)
  assert isinstance(pretrained.load(folder), CLIPModel)

  c = _tiny(steps=2)
  c.data.tokenizer, c.data.max_text_len = "clip", 16
  c.model.update(init_from=folder, lock_image_tower=True)
  c.ema.enabled = True
  trainer = Trainer(c, str(tmp_path / "run"))
  ckpt = trainer.checkpointer()
  start_state, _ = trainer.restore_or_init(ckpt)
  ckpt.close()
  start = _params(trainer, start_state)
  assert sorted(start) == sorted(saved)
  for name, value in saved.items():
    np.testing.assert_array_equal(start[name], value, err_msg=name)

  end_state = trainer.train()
  end = _params(trainer, end_state)
  vision = [n for n in saved if n.startswith(("vision_model.", "visual_projection."))]
  text = [n for n in saved if n.startswith(("text_model.", "text_projection."))]
  assert vision and text
  # The locked tower is a frozen part: no parameters, optimizer state or EMA copy of it in the trained state.
  for tree in (end_state.params, end_state.opt_state, end_state.ema):
    names = " ".join(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0])
    assert "vision_model" not in names and "visual_projection" not in names
  for name in vision:
    np.testing.assert_array_equal(end[name], saved[name], err_msg=name)
  assert any(not np.array_equal(end[n], saved[n]) for n in text)

  # A resumed run reads the locked tower from the folder again.
  c.train.steps = 3
  resumed = Trainer(c, str(tmp_path / "run"))
  later = _params(resumed, resumed.train())
  assert [r["step"] for r in read_metrics(str(tmp_path / "run")) if "train/loss" in r] == [1, 2, 3]
  for name in vision:
    np.testing.assert_array_equal(later[name], saved[name], err_msg=name)

  # The run recorded where its frozen tower came from: a changed folder is refused in one line, unless accepted.
  other = _export_tiny_clip(folder, seed=7)
  c.train.steps = 4
  with pytest.raises(ConfigError, match=r"model.init_from=.* changed since this run started .*accept_changed"):
    Trainer(c, str(tmp_path / "run")).train()
  c.train.accept_changed_sources = True
  accepted = Trainer(c, str(tmp_path / "run"))
  final = _params(accepted, accepted.train())
  for name in vision:
    np.testing.assert_array_equal(final[name], other[name], err_msg=name)
  c.train.update(steps=5, accept_changed_sources=False)
  import shutil
  shutil.rmtree(folder)
  with pytest.raises(ConfigError, match="model.init_from"):
    Trainer(c, str(tmp_path / "run")).train()


def test_init_from_checks_what_it_loads(tmp_path):
  folder = str(tmp_path / "clip")
  _export_tiny_clip(folder)
  c = _tiny()
  c.data.tokenizer, c.data.max_text_len = "clip", 32
  c.model.init_from = folder
  with pytest.raises(ConfigError, match=re.escape("data.max_text_len=32 exceeds the pretrained text tower's "
                                                  "context length 16")):
    Trainer(c, str(tmp_path / "run"))
  os.remove(os.path.join(folder, "model.safetensors"))
  c.data.max_text_len = 16
  with pytest.raises(Exception, match="model.safetensors|no weights"):
    Trainer(c, str(tmp_path / "run2"))


def test_emoji_config_trains_with_the_clip_tokenizer(tmp_path):
  from diffusion_jax.data import emoji
  from diffusion_jax.data.sources import DataError
  try:
    emoji.find_font()
  except DataError:
    pytest.skip(f"needs the colour emoji font: apt-get install {emoji.APT_PACKAGE}")
  from configs import emoji_clip
  wd = str(tmp_path / "run")
  c = emoji_clip.get_config("tiny")
  c.mesh.shape = (1, 1, 1)  # in this process (the CLI path is the MNIST test's), on one device as the CLI's runs
  Trainer(c, wd).train()
  (ev,) = [r for r in read_metrics(wd) if "eval/image_to_text_r1" in r]
  # every held-out emoji has its own name: as many distinct captions as images
  assert ev["eval/distinct_captions"] > 100
  assert 0.0 <= ev["eval/text_to_image_r10"] <= 1.0
