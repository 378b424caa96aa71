"""Evaluation tooling: sample writing and the MNIST digit classifier that judges generated digits."""
import concurrent.futures
import json
import os
import threading

import numpy as np
import pytest
from flax import serialization
from PIL import Image

from diffusion_jax.data.mnist import load_mnist
from diffusion_jax.eval import digit_classifier as dc
from diffusion_jax.eval import image_io
from diffusion_jax.pipelines.images import to_uint8


# --- image_io -------------------------------------------------------------------------------------------------

def test_to_uint8_exact_values_and_clipping():
  x = np.array([-1.0, 0.0, 1.0, -3.0, 1.7, -1.0 + 1 / 127.5], np.float32)
  got = to_uint8(x, value_range=(-1.0, 1.0))
  np.testing.assert_array_equal(got, [0, 128, 255, 0, 255, 1])
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(to_uint8(x.astype(np.float16), value_range=(-1.0, 1.0)), got)
  np.testing.assert_array_equal(to_uint8((x + 1) / 2, value_range=(0.0, 1.0)), got)


def test_to_uint8_of_unit_range_rounds_like_diffusers_numpy_to_pil():
  x = np.random.default_rng(0).random((4, 16, 16, 3), dtype=np.float32)
  np.testing.assert_array_equal(to_uint8(x, value_range=(0.0, 1.0)), (x * 255).round().astype(np.uint8))


def test_to_uint8_passes_uint8_through():
  images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  np.testing.assert_array_equal(to_uint8(images, value_range=(-1.0, 1.0)), images)


@pytest.mark.parametrize("n, cols, pad, want", [
    (5, None, 2, (2 * 30 + 2, 3 * 30 + 2, 1)),  # default cols = ceil(sqrt(5)) = 3 -> 2 rows
    (16, None, 2, (4 * 30 + 2, 4 * 30 + 2, 1)),
    (5, 5, 0, (28, 140, 1)),
    (7, 2, 1, (4 * 29 + 1, 2 * 29 + 1, 1)),
])
def test_make_grid_shape(n, cols, pad, want):
  images = np.zeros((n, 28, 28, 1), np.uint8)
  assert image_io.make_grid(images, cols=cols, pad=pad).shape == want


def test_make_grid_places_tiles_row_major_on_white():
  images = np.arange(1, 6, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 3, 3), np.uint8)
  grid = image_io.make_grid(images, cols=2, pad=1)
  assert grid.shape == (3 * 5 + 1, 2 * 4 + 1, 3)
  assert grid[0].min() == 255 and grid[:, 0].min() == 255
  np.testing.assert_array_equal(grid[1:5, 1:4], images[0])
  np.testing.assert_array_equal(grid[1:5, 5:8], images[1])
  np.testing.assert_array_equal(grid[11:15, 1:4], images[4])
  assert grid[11:15, 5:8].min() == 255  # unused last cell


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_save_samples_round_trip(tmp_path, channels, mode):
  images = np.random.default_rng(channels).uniform(-1.1, 1.1, (5, 8, 6, channels)).astype(np.float32)
  prompts = [f"a handwritten digit {d}" for d in ("zero", "one", "two", "three", "four")]
  extra = [{"label": np.int32(i), "predicted": i % 2} for i in range(5)]
  out_dir = tmp_path / "samples" / "nested"
  result = image_io.save_samples(str(out_dir), images, prompts, grid_cols=2, extra=extra)

  want = to_uint8(images, value_range=(-1.0, 1.0))
  assert result["files"] == [str(out_dir / f"{i:05d}.png") for i in range(5)]
  for i, path in enumerate(result["files"]):
    with Image.open(path) as im:
      assert im.mode == mode
      got = np.asarray(im)
    np.testing.assert_array_equal(got.reshape(want[i].shape), want[i])

  with open(result["index"]) as f:
    records = [json.loads(line) for line in f]
  assert [r["file"] for r in records] == [f"{i:05d}.png" for i in range(5)]
  assert [r["prompt"] for r in records] == prompts
  assert [r["index"] for r in records] == list(range(5))
  assert [(r["label"], r["predicted"]) for r in records] == [(i, i % 2) for i in range(5)]

  with Image.open(result["grid"]) as im:
    assert im.size == (2 * 8 + 2, 3 * 10 + 2)  # (width, height) for 2 cols x 3 rows of 8x6 tiles
    grid_png = np.asarray(im)
  assert os.path.basename(result["grid"]) == "grid.png"
  assert result["grid_image"].dtype == np.uint8 and result["grid_image"].shape == (3 * 10 + 2, 2 * 8 + 2, channels)
  np.testing.assert_array_equal(result["grid_image"].reshape(grid_png.shape), grid_png)


def test_each_sampling_gets_its_own_folder(tmp_path):
  parent = str(tmp_path / "samples")
  first = image_io.new_sample_dir(parent, "step_6")
  image_io.save_samples(first, np.zeros((3, 4, 4, 1), np.float32), ["a", "b", "c"])
  second = image_io.new_sample_dir(parent, "step_6")
  image_io.save_samples(second, np.ones((1, 4, 4, 1), np.float32), ["d"])
  assert (first, second) == (os.path.join(parent, "step_6"), os.path.join(parent, "step_6_2"))
  # Each index describes exactly the files beside it.
  for folder, n in ((first, 3), (second, 1)):
    with open(os.path.join(folder, "index.jsonl")) as f:
      files = [json.loads(line)["file"] for line in f]
    assert sorted(os.listdir(folder)) == sorted(files + ["grid.png", "index.jsonl"]) and len(files) == n


def test_concurrent_samplers_never_share_a_folder(tmp_path):
  # os.mkdir is the claim: whoever creates the folder owns it, the others move on to the next name.
  start = threading.Barrier(4)

  def claim():
    start.wait()
    return [image_io.new_sample_dir(str(tmp_path), "step_6") for _ in range(25)]

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    claimed = [d for future in [pool.submit(claim) for _ in range(4)] for d in future.result()]
  assert len(set(claimed)) == 100 and sorted(os.listdir(tmp_path)) == sorted(os.path.basename(d) for d in claimed)


def test_save_samples_never_writes_into_a_used_folder(tmp_path):
  out = tmp_path / "step_6"
  image_io.save_samples(str(out), np.zeros((2, 4, 4, 1), np.float32), ["a", "b"])
  before = {name: (out / name).read_bytes() for name in os.listdir(out)}
  with pytest.raises(FileExistsError, match="already holds files"):
    image_io.save_samples(str(out), np.ones((1, 4, 4, 1), np.float32), ["c"])
  assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_save_samples_rejects_wrong_prompt_count(tmp_path):
  with pytest.raises(ValueError, match="3 images but 2 prompts"):
    image_io.save_samples(str(tmp_path), np.zeros((3, 4, 4, 1), np.float32), ["a", "b"])


def test_save_samples_rejects_reserved_extra_keys(tmp_path):
  with pytest.raises(ValueError, match="reserved"):
    image_io.save_samples(str(tmp_path), np.zeros((1, 4, 4, 1), np.float32), ["a"], extra=[{"prompt": "b"}])


# --- digit classifier -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def classifier():
  # Far shorter than the real run (800 steps x 128): enough to show the pipeline learns, cheap enough for CI.
  return dc.train_classifier(steps=150, batch_size=64, seed=0, log_every=50)


@pytest.fixture(scope="module")
def test_subset():
  images, labels = load_mnist("test")
  return dc.mnist_as_model_input(images[:1000]), labels[:1000]


def test_short_training_learns_digits(classifier, test_subset):
  images, labels = test_subset
  # A broken pipeline (labels misaligned, wrong normalisation, no updates) sits near 0.1.
  assert classifier.accuracy(images, labels) >= 0.9


def test_shuffled_labels_score_near_chance(classifier, test_subset):
  images, labels = test_subset
  shuffled = np.random.default_rng(0).permutation(labels)
  assert classifier.accuracy(images, shuffled) < 0.2


def test_padded_32px_input_matches_28px(classifier, test_subset):
  images = test_subset[0][:200]
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-1.0)
  assert padded.shape == (200, 32, 32, 1)
  np.testing.assert_allclose(classifier.logits(padded), classifier.logits(images), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(classifier.predict(padded), classifier.predict(images))


def test_uint8_input_matches_float(classifier):
  images, _ = load_mnist("test")
  images = images[:100]
  np.testing.assert_array_equal(classifier.predict(images[..., None]),
                                classifier.predict(dc.mnist_as_model_input(images)))


def test_predict_does_not_depend_on_batching(classifier, test_subset):
  images = test_subset[0][:600]  # crosses one internal 512-image chunk
  full = classifier.predict(images)
  assert full.dtype == np.int32 and full.shape == (600,)
  np.testing.assert_array_equal(classifier.predict(images[:3]), full[:3])
  np.testing.assert_array_equal(classifier.predict(images[550:]), full[550:])


def test_predict_rejects_colour_images(classifier):
  with pytest.raises(ValueError, match="grayscale"):
    classifier.predict(np.zeros((2, 28, 28, 3), np.float32))


def test_save_load_gives_identical_predictions(classifier, test_subset, tmp_path):
  path = str(tmp_path / "clf.msgpack")
  classifier.save(path)
  with open(tmp_path / "clf.json") as f:
    info = json.load(f)
  assert info["steps"] == 150 and info["format_version"] == dc.FORMAT_VERSION

  loaded = dc.DigitClassifier.load(path)
  images = test_subset[0]
  np.testing.assert_array_equal(loaded.logits(images), classifier.logits(images))
  assert loaded.info["batch_size"] == 64


def test_load_refuses_foreign_weights(tmp_path):
  path = tmp_path / "other.msgpack"
  path.write_bytes(serialization.msgpack_serialize({"conv1": {"kernel": np.zeros((3, 3), np.float32)}}))
  with pytest.raises(ValueError, match="does not hold DigitCNN weights"):
    dc.DigitClassifier.load(str(path))


def test_load_or_train_uses_cache(classifier, tmp_path, monkeypatch):
  classifier.save(str(tmp_path / dc.WEIGHTS_NAME))

  def no_training(*args, **kwargs):
    raise AssertionError("load_or_train trained although a cached classifier exists")

  monkeypatch.setattr(dc, "train_classifier", no_training)
  loaded = dc.load_or_train(str(tmp_path))
  assert loaded.info["steps"] == 150
  monkeypatch.setenv("DIFFUSION_JAX_CACHE", str(tmp_path))
  assert dc.load_or_train().info["steps"] == 150


# --- Fréchet distance and diversity on the judge's features ----------------------------------------------------

def test_frechet_distance_of_gaussians_has_its_closed_form():
  from diffusion_jax.eval import frechet
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
  a, b = rng.uniform(0.5, 2.0, 5), rng.uniform(0.5, 2.0, 5)
  # Diagonal covariances commute: the distance is ‖μ1 − μ2‖² + Σ (√a − √b)².
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-9)
  # A rotated copy of the same Gaussian is the same distribution moved: only the non-commuting trace term is left.
  q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
  s = q @ np.diag(a) @ q.T
  assert frechet.frechet_distance(mu1, s, mu1, s) == pytest.approx(0.0, abs=1e-8)


def test_within_class_diversity_is_the_mean_pairwise_distance_and_zero_for_a_collapsed_class():
  from diffusion_jax.eval import frechet
  features = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0]])
  labels = np.array([0, 0, 1, 1])
  # class 0: one pair 5 apart; class 1: two copies of one image.
  assert frechet.within_class_diversity(features, labels) == pytest.approx(2.5)
  with pytest.raises(ValueError, match="two samples"):
    frechet.within_class_diversity(features[:1], labels[:1])


def test_judge_features_separate_real_digits_from_noise(classifier):
  from diffusion_jax.eval import frechet
  from diffusion_jax.evaluators.digits import real_like
  test_features, test_labels = classifier.test_features()
  assert test_features.shape == (10000, dc.FEATURE_WIDTH)
  labels = np.repeat(np.arange(10), 30)
  real = real_like(test_labels, labels)
  assert np.array_equal(np.sort(test_labels[real]), np.sort(labels))  # class-balanced like the samples
  images, _ = load_mnist("test")
  other_real = dc.mnist_as_model_input(images[-300:])  # held apart from the reference rows picked above
  noise = np.random.default_rng(0).uniform(-1, 1, (300, 28, 28, 1)).astype(np.float32)
  near = frechet.frechet_between(classifier.features(other_real), test_features)
  far = frechet.frechet_between(classifier.features(noise), test_features)
  assert near < 0.1 * far
  # Ten copies of one image per digit: no diversity at all; real handwriting has plenty.
  collapsed = np.repeat(dc.mnist_as_model_input(images[real[::30]]), 30, axis=0)
  assert frechet.within_class_diversity(classifier.features(collapsed), labels) == pytest.approx(0.0, abs=1e-3)
  assert frechet.within_class_diversity(test_features[real], test_labels[real]) > 1.0


def test_digit_evaluator_scores_real_digits_like_the_real_reference(classifier):
  """A 'generator' that returns held-out real digits gets the real-data figures; one that repeats a single image per
  digit loses its diversity and moves away in Fréchet distance."""
  import ml_collections
  from diffusion_jax.defaults import base_config, evaluator
  from diffusion_jax.evaluators.digits import DigitAccuracy
  train_images, train_labels = load_mnist("train")

  class Replay:
    collapse = False

    def label_prompts(self, per_class, template=""):
      labels = np.repeat(np.arange(10), per_class).astype(np.int32)
      return [f"digit {l}" for l in labels], labels

    def generate(self, ctx, prompts, seed, *, labels=None, guidance_scale=None):
      picked = np.concatenate([np.flatnonzero(train_labels == c)[:np.sum(labels == c)] for c in range(10)])
      if self.collapse:
        picked = np.concatenate([np.repeat(np.flatnonzero(train_labels == c)[:1], np.sum(labels == c))
                                 for c in range(10)])
      return dc.mnist_as_model_input(train_images[picked])

  config = base_config()
  config.task = "replay"
  spec = evaluator("digit_accuracy", per_class=40)
  task = Replay()
  judged = DigitAccuracy("digits", task, config, spec)
  judged._judge = classifier
  real = judged.run(ctx=None)
  task.collapse = True
  collapsed = judged.run(ctx=None)
  assert real["digit_accuracy"] >= 0.9
  assert real["digit_accuracy_frechet"] < 2 * real["digit_accuracy_frechet_real"]
  assert real["digit_accuracy_diversity"] == pytest.approx(real["digit_accuracy_diversity_real"], rel=0.15)
  assert collapsed["digit_accuracy_diversity"] == pytest.approx(0.0, abs=1e-3)
  assert collapsed["digit_accuracy_frechet"] > 3 * real["digit_accuracy_frechet"]
  with pytest.raises(Exception, match="per_class must be >= 2"):
    DigitAccuracy("digits", task, config, ml_collections.ConfigDict(dict(spec, per_class=1)))
