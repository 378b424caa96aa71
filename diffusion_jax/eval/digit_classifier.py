"""An independent MNIST digit classifier that judges generated digits.

A text-to-image model trained on MNIST is scored by "the fraction of samples for the prompt 'a handwritten digit
seven' that this classifier calls 7". That only means something if the judge is trained apart from the model it
judges, is accurate on real digits (>= 99% on the MNIST test split) and reads images in the convention the
diffusion models emit: float NHWC in [-1, 1] with background -1, 28x28 or 32x32 (the 28x28 digit padded by 2 px).

The CNN is small enough to train in about a minute on two CPU cores, so `load_or_train` builds it on first use and
caches the weights; nothing has to be downloaded. Its parameters carry no logical axis names, unlike the big
models: this judge is always replicated on one device, never sharded.

  python -m diffusion_jax.eval.digit_classifier [--cache_dir DIR] [--retrain]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx, serialization

from diffusion_jax.data.mnist import load_mnist

IMAGE_SIZE = 28
PADDED_SIZE = 32  # 28x28 digits padded by 2 px, the size the U-Nets/DiTs work at
NUM_CLASSES = 10
FEATURE_WIDTH = 256
# Bump when the architecture or the input convention changes, so stale caches are retrained instead of misread.
FORMAT_VERSION = 1
WEIGHTS_NAME = "digit_classifier.msgpack"

DEFAULT_STEPS = 800
DEFAULT_BATCH_SIZE = 128
DEFAULT_LEARNING_RATE = 2e-3
MAX_SHIFT = 2
_EVAL_BATCH_SIZE = 512


class DigitCNN(nnx.Module):
  """conv32 -> pool -> conv64 -> pool -> conv128 -> pool -> dense256 -> dense10 on [N, 28, 28, 1] in [-1, 1].

  Pooling after every conv keeps the cost per image near 8 MMACs, which is what makes CPU training quick.
  """

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 32, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
    self.conv3 = nnx.Conv(64, 128, (3, 3), rngs=rngs)
    self.hidden = nnx.Linear(3 * 3 * 128, FEATURE_WIDTH, rngs=rngs)  # 28 -> 14 -> 7 -> 3 after three 2x2 pools
    self.head = nnx.Linear(256, NUM_CLASSES, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """The 256 penultimate activations: the space the domain Fréchet distance and the diversity figure live in."""
    for conv in (self.conv1, self.conv2, self.conv3):
      x = nnx.max_pool(jax.nn.relu(conv(x)), (2, 2), strides=(2, 2))
    return jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.features(x))


def normalize_images(images) -> jax.Array:
  """Brings images to the float [N, 28, 28, 1] in [-1, 1] layout the CNN was trained on.

  32x32 inputs are centre-cropped (they are padded 28x28 digits, so cropping is exact); other sizes are resized.
  uint8 input is read as [0, 255]. Values are clipped to [-1, 1] because samplers overshoot a little and the CNN
  has never seen pixels outside that range.
  """
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 1:
    raise ValueError(f"expected grayscale NHWC images [N, H, W, 1], got shape {images.shape}")
  if images.dtype == jnp.uint8:
    images = images.astype(jnp.float32) / 127.5 - 1.0
  images = jnp.clip(images.astype(jnp.float32), -1.0, 1.0)
  n, h, w, _ = images.shape
  if (h, w) == (PADDED_SIZE, PADDED_SIZE):
    m = (PADDED_SIZE - IMAGE_SIZE) // 2
    return images[:, m:m + IMAGE_SIZE, m:m + IMAGE_SIZE]
  if (h, w) != (IMAGE_SIZE, IMAGE_SIZE):
    images = jax.image.resize(images, (n, IMAGE_SIZE, IMAGE_SIZE, 1), "linear")
  return images


def mnist_as_model_input(images_uint8: np.ndarray) -> np.ndarray:
  """load_mnist's uint8 [N, 28, 28] -> float32 [N, 28, 28, 1] in [-1, 1], the diffusion models' convention."""
  return (np.asarray(images_uint8, np.float32) / 127.5 - 1.0)[..., None]


def _random_shift(images: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
  """Moves each digit by up to ±max_shift px; generated digits are rarely as well centred as MNIST's."""
  n, h, w, c = images.shape
  m = max_shift
  padded = jnp.pad(images, ((0, 0), (m, m), (m, m), (0, 0)), constant_values=-1.0)
  offsets = jax.random.randint(key, (n, 2), 0, 2 * m + 1)
  crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def _train_step(graphdef, tx, max_shift, params, opt_state, all_images, all_labels, idx, key):
  """One Adam step on the batch `idx` of the device-resident train set (uint8, so it stays 40 MB)."""
  images = _random_shift(normalize_images(all_images[idx][..., None]), key, max_shift)
  labels = all_labels[idx]

  def loss_fn(p):
    logits = nnx.merge(graphdef, p)(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
  return params, opt_state, metrics


def _batch_indices(n: int, batch_size: int, seed: int):
  """Yields batches from back-to-back shuffled epochs, so every image is seen once per epoch."""
  rng = np.random.default_rng(seed)
  pending = np.empty(0, np.int32)
  while True:
    while len(pending) < batch_size:
      pending = np.concatenate([pending, rng.permutation(n).astype(np.int32)])
    yield pending[:batch_size]
    pending = pending[batch_size:]


class DigitClassifier:
  """Trained DigitCNN weights with batched, jitted inference in the diffusion models' image convention."""

  def __init__(self, model: DigitCNN, info: dict[str, Any] | None = None):
    self.graphdef, self.params = nnx.split(model)
    self.info = dict(info or {})  # training settings and measured test accuracy; saved next to the weights
    graphdef = self.graphdef
    self._logits_fn = jax.jit(lambda params, x: nnx.merge(graphdef, params)(normalize_images(x)))
    self._features_fn = jax.jit(lambda params, x: nnx.merge(graphdef, params).features(normalize_images(x)))
    self._test_features = None

  def _run(self, fn, images, width: int) -> np.ndarray:
    """fn over `images` in chunks padded to a power of two, so odd N compiles at most a few shapes."""
    images = np.asarray(images)
    if images.ndim != 4:
      raise ValueError(f"expected NHWC images [N, H, W, 1], got shape {images.shape}")
    out = []
    for start in range(0, images.shape[0], _EVAL_BATCH_SIZE):
      chunk = images[start:start + _EVAL_BATCH_SIZE]
      size = min(_EVAL_BATCH_SIZE, 1 << (len(chunk) - 1).bit_length())
      padded = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])
      out.append(np.asarray(fn(self.params, padded))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, width), np.float32)

  def logits(self, images) -> np.ndarray:
    """float32 [N, 10]."""
    return self._run(self._logits_fn, images, NUM_CLASSES)

  def features(self, images) -> np.ndarray:
    """float32 [N, 256] penultimate activations (see DigitCNN.features)."""
    return self._run(self._features_fn, images, FEATURE_WIDTH)

  def test_features(self) -> tuple[np.ndarray, np.ndarray]:
    """(features [10000, 256], labels) of the MNIST test split: the real digits generated ones are compared with."""
    if self._test_features is None:
      images, labels = load_mnist("test")
      self._test_features = self.features(mnist_as_model_input(images)), np.asarray(labels, np.int32)
    return self._test_features

  def predict(self, images) -> np.ndarray:
    """int32 [N] digit labels for float [-1, 1] (or uint8) images [N, H, W, 1], any H, W (see normalize_images)."""
    return np.argmax(self.logits(images), axis=-1).astype(np.int32)

  def accuracy(self, images, labels) -> float:
    """Fraction of images whose predicted digit equals `labels` (int [N])."""
    labels = np.asarray(labels)
    if labels.shape != (np.shape(images)[0],):
      raise ValueError(f"labels shape {labels.shape} does not match {np.shape(images)[0]} images")
    if not len(labels):
      raise ValueError("accuracy of zero images is undefined")
    return float(np.mean(self.predict(images) == labels))

  def save(self, path: str) -> None:
    """Weights as flax msgpack (no pickle: loading must not run code) plus `<path stem>.json` with self.info."""
    weights = jax.tree.map(np.asarray, nnx.to_pure_dict(self.params))
    _atomic_write(path, serialization.msgpack_serialize(weights))
    info = {"format_version": FORMAT_VERSION, **self.info}
    _atomic_write(_info_path(path), (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())

  @classmethod
  def load(cls, path: str) -> DigitClassifier:
    """Reads what `save` wrote; refuses files whose tensors do not match DigitCNN exactly."""
    with open(path, "rb") as f:
      weights = serialization.msgpack_restore(f.read())
    model = DigitCNN(rngs=nnx.Rngs(0))
    _, state = nnx.split(model)
    expected = jax.tree.map(lambda x: (x.shape, str(x.dtype)), nnx.to_pure_dict(state))
    found = jax.tree.map(lambda x: (np.shape(x), str(np.asarray(x).dtype)), weights)
    if found != expected:
      raise ValueError(f"{path} does not hold DigitCNN weights (format {FORMAT_VERSION}); delete it to retrain")
    nnx.replace_by_pure_dict(state, weights)
    nnx.update(model, state)
    return cls(model, _read_info(path))


def load(path: str) -> DigitClassifier:
  """Same as DigitClassifier.load, for symmetry with load_or_train."""
  return DigitClassifier.load(path)


def _info_path(weights_path: str) -> str:
  return os.path.splitext(weights_path)[0] + ".json"


def _read_info(weights_path: str) -> dict[str, Any]:
  if not os.path.exists(_info_path(weights_path)):
    return {}
  with open(_info_path(weights_path)) as f:
    return json.load(f)


def _atomic_write(path: str, data: bytes) -> None:
  # Several processes may build the cache at once; readers must never see a half-written file.
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def train_classifier(steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
                     log_every: int = 200, learning_rate: float = DEFAULT_LEARNING_RATE) -> DigitClassifier:
  """Trains a DigitCNN on the MNIST train split with ±2 px random shifts; deterministic given `seed`."""
  images, labels = load_mnist("train")
  all_images, all_labels = jnp.asarray(images), jnp.asarray(labels)
  model = DigitCNN(rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup_steps=min(100, steps // 10), decay_steps=steps, end_value=learning_rate / 100)
  tx = optax.adam(schedule)
  opt_state = tx.init(params)
  step_fn = jax.jit(functools.partial(_train_step, graphdef, tx, MAX_SHIFT), donate_argnums=(0, 1))
  base_key = jax.random.key(seed)
  batches = _batch_indices(len(images), batch_size, seed)

  logging.info("training digit classifier: %d steps, batch %d, lr %g", steps, batch_size, learning_rate)
  start = time.perf_counter()
  for step in range(1, steps + 1):
    params, opt_state, metrics = step_fn(
        params, opt_state, all_images, all_labels, next(batches), jax.random.fold_in(base_key, step))
    if step % log_every == 0 or step == steps:
      metrics = jax.device_get(metrics)
      if not np.isfinite(metrics["loss"]):
        raise FloatingPointError(f"digit classifier loss is {metrics['loss']} at step {step}")
      logging.info("step %d/%d: loss %.4f, batch accuracy %.3f (%.1f s)", step, steps, metrics["loss"],
                   metrics["accuracy"], time.perf_counter() - start)
  jax.block_until_ready(params)
  nnx.update(model, params)
  info = {"steps": steps, "batch_size": batch_size, "seed": seed, "learning_rate": learning_rate,
          "max_shift": MAX_SHIFT, "train_seconds": round(time.perf_counter() - start, 1)}
  return DigitClassifier(model, info)


def mnist_test_accuracy(classifier: DigitClassifier) -> tuple[float, int]:
  """(accuracy, number of images) on the full MNIST test split."""
  images, labels = load_mnist("test")
  return classifier.accuracy(mnist_as_model_input(images), labels), len(labels)


def default_cache_dir() -> str:
  return os.environ.get("DIFFUSION_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "diffusion_jax")


def load_or_train(cache_dir: str | None = None, *, retrain: bool = False) -> DigitClassifier:
  """The cached classifier from `cache_dir`, training and caching it first if absent, stale or `retrain`."""
  path = os.path.join(cache_dir or default_cache_dir(), WEIGHTS_NAME)
  if os.path.exists(path) and not retrain:
    # The version is checked before the weights, whose layout may be exactly what changed.
    version = _read_info(path).get("format_version")
    if version == FORMAT_VERSION:
      classifier = DigitClassifier.load(path)
      logging.info("loaded digit classifier from %s (test accuracy %s)", path, classifier.info.get("test_accuracy"))
      return classifier
    logging.warning("%s has format %s, expected %d: retraining", path, version, FORMAT_VERSION)

  logging.info("training digit classifier; will cache it at %s", path)
  classifier = train_classifier()
  accuracy, count = mnist_test_accuracy(classifier)
  classifier.info.update(test_accuracy=round(accuracy, 4), test_images=count)
  logging.info("digit classifier test accuracy %.4f on %d images", accuracy, count)
  classifier.save(path)
  logging.info("saved digit classifier to %s", path)
  return classifier


def accuracy(judge: DigitClassifier, images: np.ndarray, labels: np.ndarray) -> dict:
  """{'accuracy': share of `images` the judge labels as `labels`, 'per_class': that share for each digit 0–9}."""
  labels = np.asarray(labels)
  correct = judge.predict(images) == labels
  return {"accuracy": float(np.mean(correct)),
          "per_class": [float(np.mean(correct[labels == c])) if np.any(labels == c) else float("nan")
                        for c in range(10)]}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cache_dir", default=None, help="defaults to $DIFFUSION_JAX_CACHE or ~/.cache/diffusion_jax")
  parser.add_argument("--retrain", action="store_true", help="train even if a cached classifier exists")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  classifier = load_or_train(args.cache_dir, retrain=args.retrain)
  accuracy, count = mnist_test_accuracy(classifier)
  print(f"digit classifier test accuracy: {accuracy:.4f} ({count} images)")


if __name__ == "__main__":
  main()
