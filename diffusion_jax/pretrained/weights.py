"""Reading PyTorch-ecosystem weight files as numpy and writing them into NNX modules.

safetensors is read with its numpy API (no torch). Pickle-based `.bin`/`.pt` files can execute code when
loaded, so they are read only when the caller passes `allow_pickle=True`, and then through
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Mapping, Optional

import numpy as np
from flax import nnx

SAFETENSORS_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
PICKLE_NAMES = ("pytorch_model.bin", "diffusion_pytorch_model.bin")


class WeightsError(ValueError):
  """A weight file that is missing, unreadable, or does not fit the model; the message is one line."""


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  try:
    return load_file(path)
  except Exception as e:  # noqa: BLE001  (a truncated or foreign file: name it in one line)
    raise WeightsError(f"cannot read safetensors file {path}: {str(e).splitlines()[0]}") from None


def _read_pickle(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
  if not allow_pickle:
    raise WeightsError(
        f"{path} is a pickle file, which can run arbitrary code when loaded; pass allow_pickle=True if you trust "
        "it, or convert it to safetensors")
  try:
    import torch
  except ImportError:
    raise WeightsError(f"reading {path} needs torch (pip install torch); safetensors files do not") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001
    raise WeightsError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
  if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
    state = state["state_dict"]
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in state.items() if hasattr(v, "numpy")}


def read_file(path: str, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """A single weight file (safetensors, or with `allow_pickle` a torch pickle) as name → numpy array."""
  if not os.path.isfile(path):
    raise WeightsError(f"no weight file at {path}")
  if path.endswith(".safetensors"):
    return _read_safetensors(path)
  return _read_pickle(path, allow_pickle)


def read_folder(folder: str, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """The state dict of a `save_pretrained` folder: safetensors first (single or sharded), then pickle files."""
  for name in SAFETENSORS_NAMES + PICKLE_NAMES:
    index = os.path.join(folder, name + ".index.json")
    if os.path.isfile(index):
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      state = {}
      for shard in shards:
        state.update(read_file(os.path.join(folder, shard), allow_pickle=allow_pickle))
      return state
    if os.path.isfile(os.path.join(folder, name)):
      return read_file(os.path.join(folder, name), allow_pickle=allow_pickle)
  raise WeightsError(f"no weights in {folder}: expected one of {', '.join(SAFETENSORS_NAMES + PICKLE_NAMES)}")


def read_config(folder: str) -> dict:
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise WeightsError(f"no config.json in {folder}")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise WeightsError(f"{path} is not valid JSON: {e}") from None


def _param_paths(model: nnx.Module) -> dict[str, nnx.Param]:
  return {".".join(str(p) for p in path): var for path, var in nnx.iter_graph(model)
          if isinstance(var, nnx.Param)}


def assign(model: nnx.Module, arrays: Mapping[str, np.ndarray], *, source: str = "checkpoint",
           ignore_missing: Iterable[str] = ()) -> None:
  """Writes `arrays` (keyed by the model's own dotted parameter paths) into `model` in place.

  Every parameter of the model must be given with its exact shape; anything unused in `arrays` is an error too,
  so a mapping bug can never load silently. One-line `WeightsError`s name the first few offenders.
  """
  params = _param_paths(model)
  ignore = set(ignore_missing)
  missing = sorted(set(params) - set(arrays) - ignore)
  unexpected = sorted(set(arrays) - set(params))
  if missing:
    raise WeightsError(f"{source} is missing {len(missing)} weights the model needs, e.g. {missing[:3]}")
  if unexpected:
    raise WeightsError(f"{source} has {len(unexpected)} weights the model does not use, e.g. {unexpected[:3]}")
  for name, value in arrays.items():
    var = params[name]
    if tuple(var.value.shape) != tuple(value.shape):
      raise WeightsError(f"{source}: weight {name} has shape {tuple(value.shape)}, the model expects "
                         f"{tuple(var.value.shape)}")
  for name, value in arrays.items():
    var = params[name]
    var.value = np.asarray(value, dtype=var.value.dtype)


def model_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's parameters as dotted path → numpy array (the inverse of `assign`)."""
  return {name: np.asarray(var.value) for name, var in _param_paths(model).items()}


def take(state: dict[str, np.ndarray], key: str, source: str = "checkpoint",
         transform: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> np.ndarray:
  """`state.pop(key)` with a one-line error naming the missing key; lets mappings detect leftovers."""
  if key not in state:
    raise WeightsError(f"{source} has no weight {key!r}")
  value = state.pop(key)
  return transform(value) if transform else value


def save_safetensors(arrays: Mapping[str, np.ndarray], path: str, metadata: Optional[dict] = None) -> None:
  from safetensors.numpy import save_file
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # np.ascontiguousarray promotes 0-d arrays to 1-d; keep scalars (CLIP's logit_scale) scalar.
  save_file({k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in arrays.items()}, path,
            metadata=metadata or {"format": "pt"})
