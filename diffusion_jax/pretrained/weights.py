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


# Layouts: how a PyTorch tensor is arranged against ours, as the permutation that takes its axes to ours. 'linear'
# weights are [out, in] (ours [in, out]), 'conv' kernels OIHW (ours HWIO); 'same' needs none (biases, norms,
# embeddings).
_TO_OURS = {"linear": (1, 0), "conv": (2, 3, 1, 0), "same": None}
# Our attention's projections (models/attention.py) under diffusers' names; its to_out is a ModuleList holding the
# linear layer and a dropout.
DIFFUSERS_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "out": "to_out.0"}


def linear_pairs(ours: str, theirs: Optional[str] = None) -> list[tuple[str, str, str]]:
  """(our path, PyTorch key, layout) of a linear layer's kernel and bias; `theirs` defaults to the same name."""
  theirs = theirs or ours
  return [(f"{ours}.kernel", f"{theirs}.weight", "linear"), (f"{ours}.bias", f"{theirs}.bias", "same")]


def norm_pairs(ours: str, theirs: Optional[str] = None) -> list[tuple[str, str, str]]:
  """(our path, PyTorch key, layout) of a layer/group norm's scale and bias (PyTorch's `weight`)."""
  theirs = theirs or ours
  return [(f"{ours}.scale", f"{theirs}.weight", "same"), (f"{ours}.bias", f"{theirs}.bias", "same")]


def arrays_from_pairs(state: Mapping[str, np.ndarray], pairs: Iterable[tuple[str, str, str]],
                      source: str = "checkpoint") -> dict[str, np.ndarray]:
  """A PyTorch state dict → our dotted paths and layouts by an explicit (ours, theirs, layout) list, which must
  use every weight of the state dict (a one-line WeightsError names what is missing or left over)."""
  state = dict(state)
  arrays = {ours: from_torch(take(state, theirs, source), layout) for ours, theirs, layout in pairs}
  if state:
    leftover = sorted(state)
    raise WeightsError(f"{source} has {len(leftover)} weights the model does not use, e.g. {leftover[:3]}")
  return arrays


def state_from_pairs(arrays: Mapping[str, np.ndarray],
                     pairs: Iterable[tuple[str, str, str]]) -> dict[str, np.ndarray]:
  """Our parameters (`model_arrays`) → a float32 PyTorch state dict; the inverse of `arrays_from_pairs`."""
  return {theirs: np.ascontiguousarray(to_torch(np.asarray(arrays[ours], np.float32), layout))
          for ours, theirs, layout in pairs}


def kernel_layout(ndim: int) -> str:
  """The layout of a kernel known only by its rank: 4-D convolutions, 2-D linear weights."""
  return {2: "linear", 4: "conv"}.get(ndim, "same")


def _permute(value: np.ndarray, layout: str, inverse: bool) -> np.ndarray:
  axes = _TO_OURS[layout]
  if axes is None:
    return value
  return value.transpose(np.argsort(axes) if inverse else axes)


def from_torch(value: np.ndarray, layout: str) -> np.ndarray:
  """A PyTorch tensor (as numpy) in our layout."""
  return _permute(value, layout, inverse=False)


def to_torch(value: np.ndarray, layout: str) -> np.ndarray:
  """One of our parameters in PyTorch's layout (the inverse of `from_torch`)."""
  return _permute(value, layout, inverse=True)


def torch_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  """The PyTorch shape of a parameter of ours with this shape, for error messages in the checkpoint's terms."""
  return to_torch(np.broadcast_to(np.empty((), np.bool_), shape), layout).shape  # a view: nothing allocated


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
