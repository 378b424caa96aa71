"""Moving values between the mesh and this host: whole arrays on every process, and fixed-size chunked calls.

Written once for every task, evaluator and pipeline: evaluation gathers embeddings or images from all processes,
and a jitted function called on inputs of varying length is fed fixed-size chunks, the last one padded by repeating
its final row, so one program is compiled whatever the length.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils


def gather(tree: Any) -> Any:
  """Every leaf as a numpy array holding the whole (global) value, on every process (numpy leaves, which each
  process already holds whole, stay as they are)."""

  def whole(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))

  return jax.tree.map(whole, tree)


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
  """`x` with its last row repeated up to `size` rows."""
  n = len(x)
  return x if n >= size else np.concatenate([x, np.repeat(x[-1:], size - n, axis=0)])


def run_chunked(fn: Callable[..., Any], inputs: Mapping[str, np.ndarray] | np.ndarray, chunk: int, *,
                extra: Callable[[int], tuple] = lambda i: (), desc: str = "") -> Any:
  """`fn` over `inputs` (an array or a dict of arrays with one leading length) in chunks of `chunk` rows.

  `fn(chunk_inputs, *extra(i))` returns a pytree of arrays with the chunk as leading axis (e.g. images); the
  results are gathered to the host, cut to the real rows and concatenated. `extra(i)` gives per-chunk arguments
  (e.g. a fold_in rng). A `desc` shows a progress bar over the chunks (on the main process, when there are two or
  more).
  """
  as_dict = isinstance(inputs, Mapping)
  arrays = dict(inputs) if as_dict else {"x": inputs}
  n = len(next(iter(arrays.values())))
  pieces = []
  starts = range(0, n, chunk)
  if desc and len(starts) > 1 and jax.process_index() == 0:
    from tqdm.auto import tqdm
    starts = tqdm(starts, desc=desc, unit="chunk", leave=False, dynamic_ncols=True)
  for i, start in enumerate(starts):
    part = {k: pad_rows(np.asarray(v[start:start + chunk]), chunk) for k, v in arrays.items()}
    out = fn(part if as_dict else part["x"], *extra(i))
    size = min(chunk, n - start)
    pieces.append(jax.tree.map(lambda x: x[:size], gather(out)))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *pieces)
