"""`main --mode sample --pretrained FOLDER`: images, index.jsonl and grid.png from a diffusers SD folder, and
one-line errors for folders that are not pipelines."""
import json
import os

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusion_jax import sample_pretrained  # noqa: E402
from tests.test_cli import _error_line, run_cli  # noqa: E402
from tests.test_sd_pipeline import SIZE, _unet, sd_parts  # noqa: E402

PROMPTS = ("a photo of a cat", "a red apple on a table")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
  """A tiny random SD pipeline saved with diffusers' `save_pretrained` (transformers 5 writes tokenizer.json only)."""
  root = tmp_path_factory.mktemp("sd_sample")
  pipe = diffusers.StableDiffusionPipeline(unet=_unet(4, 1), **sd_parts(root))
  folder = str(root / "sd")
  pipe.save_pretrained(folder)
  return folder


def _read(out_dir):
  with open(os.path.join(out_dir, "index.jsonl")) as f:
    index = [json.loads(line) for line in f]
  return index, [np.asarray(Image.open(os.path.join(out_dir, r["file"]))).astype(int) for r in index]


def test_cli_writes_images_index_and_grid(sd_folder, tmp_path):
  wd = str(tmp_path / "cli")
  proc = run_cli("--mode", "sample", "--pretrained", sd_folder, "--workdir", wd,
                 f"--config.sample.prompts={PROMPTS!r}", "--config.sample.per_prompt=2",
                 "--config.sample.num_steps=3", "--config.sample.batch_size=3", "--config.sample.seed=7",
                 "--config.sample.negative_prompt=blurry")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = os.path.join(wd, "samples", "pretrained")
  index, images = _read(out)
  assert [r["prompt"] for r in index] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
  assert [r["seed"] for r in index] == [7, 8, 9, 10]
  assert {(r["sampler"], r["num_steps"], r["negative_prompt"], r["height"]) for r in index} == {
      ("ddim", 3, "blurry", SIZE)}
  assert all(im.shape == (SIZE, SIZE, 3) for im in images)
  assert np.abs(images[0] - images[1]).mean() > 2  # one prompt, two seeds: two pictures
  grid = np.asarray(Image.open(os.path.join(out, "grid.png")))
  assert grid.shape[:2] == (2 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2)  # a row per prompt

  # In-process with another batch size (the CLI ran 3 + a padded 1): every image starts from its own seed's noise.
  config = sample_pretrained.get_config()
  config.sample.update(prompts=PROMPTS, per_prompt=2, num_steps=3, batch_size=4, seed=7, negative_prompt="blurry")
  sample_pretrained.run(config, sd_folder, str(tmp_path / "lib"))
  _, again = _read(os.path.join(tmp_path, "lib", "samples", "pretrained"))
  for a, b in zip(images, again):
    assert np.abs(a - b).max() <= 1  # float rounding of another batch shape may flip a uint8 level


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such folder"),
    ("not_a_pipeline", "model_index.json"),
    ("train_mode", "use --mode sample"),
    ("no_prompts", "sample.prompts must be a non-empty tuple"),
])
def test_errors_are_one_line_and_exit_code_2(sd_folder, tmp_path, case, expected):
  folder = {"missing": str(tmp_path / "nope"), "not_a_pipeline": os.path.join(sd_folder, "unet")}.get(case, sd_folder)
  args = ["--mode", "train" if case == "train_mode" else "sample", "--pretrained", folder, "--workdir", str(tmp_path)]
  if case == "no_prompts":
    args += ["--config", "configs/sd_sample.py", "--config.sample.prompts=()"]
  proc = run_cli(*args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert expected in _error_line(proc) and "Traceback" not in proc.stderr


def test_sampling_config_without_pretrained_is_an_error(tmp_path):
  proc = run_cli("--config", "configs/sd_sample.py", "--workdir", str(tmp_path), "--mode", "sample")
  assert proc.returncode == 2 and "--pretrained FOLDER" in _error_line(proc)
