"""Load the public PyTorch checkpoints users already have into our NNX models.

  from diffusion_jax import pretrained
  model = pretrained.load("path/to/folder")          # a transformers or diffusers save_pretrained folder

The folder's `config.json` names its class (`_class_name` for diffusers, `architectures` for transformers); each
model family registers a loader for the class names it understands.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

from diffusion_jax.pretrained.weights import WeightsError, read_config

__all__ = ["WeightsError", "load", "register_loader", "known_classes"]

# Modules that register loaders on import; imported lazily so `import diffusion_jax.pretrained` stays cheap.
_LOADER_MODULES = (
    "diffusion_jax.pretrained.clip",
    "diffusion_jax.pretrained.dit",
    "diffusion_jax.pretrained.vae",
    "diffusion_jax.pretrained.unet",
)
_LOADERS: dict[str, Callable[..., object]] = {}


def register_loader(*class_names: str):
  """Decorator: `fn(folder, config_dict, *, allow_pickle, **kwargs) -> model` handles these class names."""
  def deco(fn):
    for name in class_names:
      _LOADERS[name] = fn
    return fn
  return deco


def _import_loaders() -> None:
  for name in _LOADER_MODULES:
    try:
      importlib.import_module(name)
    except ModuleNotFoundError as e:
      if e.name != name:  # a real missing dependency inside the loader module
        raise


def known_classes() -> list[str]:
  _import_loaders()
  return sorted(_LOADERS)


def class_name_of(config: dict) -> str:
  if config.get("_class_name"):
    return config["_class_name"]
  archs = config.get("architectures") or []
  return archs[0] if archs else ""


def load(path: str, *, allow_pickle: bool = False, **kwargs):
  """The NNX model stored in a `save_pretrained` folder, with its weights.

  `allow_pickle=True` permits `pytorch_model.bin`-style pickle files when the folder has no safetensors.
  """
  if not os.path.isdir(path):
    raise WeightsError(f"no such folder: {path}")
  config = read_config(path)
  name = class_name_of(config)
  _import_loaders()
  if name not in _LOADERS:
    raise WeightsError(f"{path}: cannot load model class {name or '(none named in config.json)'!r}; "
                       f"known classes: {', '.join(sorted(_LOADERS))}")
  return _LOADERS[name](path, config, allow_pickle=allow_pickle, **kwargs)


def load_pipeline(path: str, **kwargs):
  """A diffusers Stable Diffusion folder as `pipelines.stable_diffusion.StableDiffusionPipeline`; see
  `pretrained.pipeline.load_pipeline`. Imported lazily: it pulls in the U-Net, VAE, CLIP and sampler modules."""
  from diffusion_jax.pretrained.pipeline import load_pipeline as load
  return load(path, **kwargs)
