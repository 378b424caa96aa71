"""Load the public PyTorch checkpoints users already have into our NNX models.

  from diffusion_jax import pretrained
  model = pretrained.load("path/to/folder")          # a transformers or diffusers save_pretrained folder

The folder's `config.json` names its class (`_class_name` for diffusers, `architectures` for transformers); each
model family registers a loader for the class names it understands.
"""
from __future__ import annotations

import os

from diffusion_jax.pretrained.weights import WeightsError, read_config
from diffusion_jax.registry import Registry

__all__ = ["WeightsError", "load", "register_loader", "known_classes"]

# Modules that register loaders on import; imported lazily so `import diffusion_jax.pretrained` stays cheap.
_LOADERS = Registry("model class", ("diffusion_jax.pretrained.clip", "diffusion_jax.pretrained.siglip",
                                    "diffusion_jax.pretrained.dit", "diffusion_jax.pretrained.vae",
                                    "diffusion_jax.pretrained.unet", "diffusion_jax.pretrained.llama",
                                    "diffusion_jax.pretrained.llava", "diffusion_jax.pretrained.prior",
                                    "diffusion_jax.pretrained.vit", "diffusion_jax.pretrained.mae"))
# Decorator: `fn(folder, config_dict, *, allow_pickle, **kwargs) -> model` handles these class names.
register_loader = _LOADERS.register


def known_classes() -> list[str]:
  return _LOADERS.names()


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
  loader = _LOADERS.find(name)
  if loader is None:
    raise WeightsError(f"{path}: cannot load model class {name or '(none named in config.json)'!r}; "
                       f"known classes: {', '.join(known_classes())}")
  return loader(path, config, allow_pickle=allow_pickle, **kwargs)


def load_pipeline(path: str, **kwargs):
  """A diffusers Stable Diffusion folder as `pipelines.stable_diffusion.StableDiffusionPipeline`, an unCLIP (Karlo)
  folder as `pipelines.unclip.UnCLIPPipeline`; see `pretrained.pipeline.load_pipeline`. Imported lazily: it pulls in the U-Net, VAE, CLIP and sampler modules."""
  from diffusion_jax.pretrained.pipeline import load_pipeline as load
  return load(path, **kwargs)
