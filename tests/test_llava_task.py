"""LLaVA's stages on the shared trainer: a tiny CLIP run → stage 0 (language) → stage 1 (projector) → stage 2,
with frozen parts equal to their sources, only the trained parts checkpointed, evaluators, and sampling from the
CLI into captions.jsonl and a contact sheet."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs.mnist_clip import get_config as clip_config
from configs.mnist_llava import get_config
from diffusion_jax.config import ConfigError
from diffusion_jax.data import mnist
from diffusion_jax.pipelines.image_to_text import ImageToText
from diffusion_jax.train import parts, runs
from diffusion_jax.train.task import get_task
from diffusion_jax.train.trainer import Trainer
from tests.test_cli import run_cli
from tests.test_contrastive_task import _params


def pipe_config(workdir):
  return runs.RunSource("workdir", workdir, task="llava").config()


def _train(config, workdir):
  trainer = Trainer(config, workdir)
  state = trainer.train()
  return trainer, state


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  root = tmp_path_factory.mktemp("llava")
  runs = {name: str(root / name) for name in ("clip", "lm", "align", "instruct")}
  c = clip_config("tiny")
  c.train.update(eval_at_end=False)
  _train(c, runs["clip"])
  c = get_config("lm,tiny")
  lm = _train(c, runs["lm"])
  c = get_config("align,tiny")
  c.llava.update(vision_from=runs["clip"], lm_from=runs["lm"])
  align = _train(c, runs["align"])
  return runs, lm, align


def _under(params, prefix):
  return {k[len(prefix) + 1:]: v for k, v in params.items() if k.startswith(prefix + ".")}


def test_stage1_trains_the_projector_on_frozen_sources(chain):
  runs, (lm_trainer, lm_state), (trainer, state) = chain
  # Only the projector is trained, so only it (and no optimizer state of the rest) is in the checkpoint.
  assert {k.split(".")[0] for k in _params_of(state)} == {"projector"}
  got = _params(trainer, state)
  lm = _params(lm_trainer, lm_state)
  for k, v in _under(lm, "language_model").items():
    np.testing.assert_array_equal(got["language_model." + k], v)
  clip = Trainer(clip_config("tiny"), runs["clip"])
  clip_params = _params(clip, clip.load_for_inference())
  for k, v in _under(clip_params, "vision_model").items():
    np.testing.assert_array_equal(got["vision_model." + k], v)


def _params_of(state):
  from diffusion_jax.train import parts
  return {k for update in state.params.values() for k in parts.flat_names(update)}


def test_stage2_starts_from_stage1s_projector_and_its_language_model(chain):
  runs, (lm_trainer, lm_state), (align_trainer, align_state) = chain
  c = get_config("instruct,tiny")
  c.llava.projector_from = runs["align"]  # vision and language sources come from that run's config
  trainer = Trainer(c, runs["instruct"])
  ckpt = trainer.checkpointer()
  state, _ = trainer.restore_or_init(ckpt)
  ckpt.close()
  assert {k.split(".")[0] for k in _params_of(state)} == {"projector", "language_model"}
  got = _params(trainer, state)
  for prefix, (t, s) in (("projector", (align_trainer, align_state)), ("language_model", (lm_trainer, lm_state)),
                         ("vision_model", (align_trainer, align_state))):
    for k, v in _under(_params(t, s), prefix).items():
      np.testing.assert_array_equal(got[f"{prefix}.{k}"], v, err_msg=k)
  c.llava.train_vision = True  # the tower trains too, from the CLIP run's weights
  trainer = Trainer(c, runs["instruct"] + "_vision")
  assert "vision_model" in {k.split(".")[0] for k in parts.flat_names(trainer.abstract_state.params["main"])}


def test_stage2_evaluates_and_the_cli_samples_answers_about_given_images(chain, tmp_path):
  runs = chain[0]
  wd = str(tmp_path / "instruct")
  c = get_config("instruct,tiny")
  c.llava.projector_from = runs["align"]
  c.train.sample_at_end = False  # --mode sample below is the user's path
  _train(c, wd)
  from diffusion_jax.train.metrics_writer import read_metrics
  (ev,) = [r for r in read_metrics(wd) if "eval/vqa_accuracy" in r]
  for key in ("vqa_accuracy", "caption_digit_accuracy"):
    assert 0.0 <= ev[f"eval/{key}"] <= 1.0
  assert ev["eval/perplexity"] > 1.0
  images, _ = mnist.load_mnist("test")
  paths = []
  for i in range(2):
    paths.append(str(tmp_path / f"digit{i}.png"))
    Image.fromarray(images[i]).save(paths[-1])
  proc = run_cli("--config", "configs/mnist_llava.py:instruct,tiny", "--workdir", wd, "--mode=sample",
                 f"--config.llava.projector_from={runs['align']}", f"--config.sample.images=(\"{paths[0]}\", \"{paths[1]}\")",
                 "--config.sample.question=Is the digit even or odd?")
  assert proc.returncode == 0, proc.stderr[-3000:]
  step_dir = os.path.join(wd, "samples", "step_2")
  rows = [json.loads(line) for line in open(os.path.join(step_dir, "captions.jsonl"))]
  assert [r["image"] for r in rows] == paths
  assert all(r["question"] == "Is the digit even or odd?" and isinstance(r["answer"], str) for r in rows)
  sheet = open(os.path.join(step_dir, "contact_sheet.html")).read()
  assert sheet.count("data:image/png;base64,") == 2 and "Is the digit even or odd?" in sheet

  # The high-level call on the finished run: the chat template builds the prompts training used, and the answers
  # are the ones --mode sample wrote.
  pipe = ImageToText.from_run(wd)
  question = "Is the digit even or odd?"
  assert pipe.prompt_ids(question) == get_task(pipe_config(wd)).prompt_ids(question)
  assert pipe([Image.open(p) for p in paths], question, max_new_tokens=16) == [r["answer"] for r in rows]


def test_stage_errors_are_one_line(chain):
  runs = chain[0]
  c = get_config("align,tiny")
  with pytest.raises(ConfigError, match="llava.stage=1 trains on a pretrained vision tower"):
    Trainer(c, "/tmp/unused")
  c = get_config("instruct,tiny")
  c.llava.projector_from = runs["clip"]
  with pytest.raises(ConfigError, match="is a 'contrastive' run, not a 'llava' run"):
    Trainer(c, "/tmp/unused")
