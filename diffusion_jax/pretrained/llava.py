"""LLaVA vision–language models in and out of transformers folders (`LlavaForConditionalGeneration`).

  vlm = pretrained.load("llava-folder")                 # -> models.llava.LlavaModel
  logits = vlm(input_ids, pixels)                       # input_ids hold the image token as LlavaProcessor expands it
  out = vlm.generate(input_ids, pixels, max_new_tokens=32)
  save_transformers(vlm, "out/")                        # LlavaForConditionalGeneration.from_pretrained("out/")

A LLaVA checkpoint is a CLIP or SigLIP vision tower, a two-layer projector and a Llama/Qwen2 language model side by
side, so this module only splits the state dict by part and hands the tower to `pretrained.clip` or `pretrained.siglip`
(by `vision_config.model_type`, see `_TOWERS`) and the language model to `pretrained.llama`: their configs, key maps
and shape checks are the ones their own folders use. A SigLIP tower keeps its MAP head and post-norm in the file
(transformers saves them though LLaVA reads neither), so they are loaded and exported too.

Key layouts: transformers 5 saves the original checkpoints' names (`vision_tower.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head.weight`) and renames them to its in-memory module names
(`model.vision_tower.*`, ..., `lm_head.weight`) on load; both, and towers with or without the `vision_model.` level
of older versions, are read. Export writes what transformers 5 itself writes.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.models.llava import LlavaConfig, LlavaModel
from diffusion_jax.models.vit import CLIPVisionConfig
from diffusion_jax.models.tracing import abstract_model
from diffusion_jax.pretrained import clip, llama, register_loader, siglip
from diffusion_jax.pretrained.weights import (WeightsError, assign, from_torch, model_arrays, read_folder,
                                              save_safetensors, take, to_torch, torch_shape)

__all__ = ["assign_transformers", "config_from_transformers", "load_transformers", "save_transformers",
           "transformers_config"]

# LlavaConfig's vision_config when a config.json has none (llava-1.5's CLIP ViT-L/14 at 336 pixels).
_DEFAULT_VISION = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, patch_size=14,
                       image_size=336, num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
_TEXT_TYPES = ("llama", "qwen2")


class _Tower(NamedTuple):
  """One vision tower family's part of a LLaVA folder: its config both ways and its state dict both ways (keys as a
  bare tower's transformers checkpoint has them, with or without `vision_model.`)."""
  config_from: Callable[..., CLIPVisionConfig]             # (vision_config dict, source=, dtype=, attention_impl=)
  config_to: Callable[[CLIPVisionConfig], dict]            # ValueError for a tower the family cannot hold
  assign: Callable[[nnx.Module, dict, str], None]          # (tower, state, source)
  state: Callable[[nnx.Module], dict[str, np.ndarray]]     # keys under `vision_model.`


_TOWERS = {
    "clip_vision_model": _Tower(clip.vision_config_from_transformers, clip.vision_config_to_transformers,
                                clip.assign_transformers, clip.transformers_state),
    "siglip_vision_model": _Tower(siglip.vision_config, siglip.vision_config_to_transformers,
                                  siglip.assign_transformers, siglip.transformers_state),
}


def _tower_type(vision: CLIPVisionConfig) -> str:
  """The transformers tower our vision config is: SigLIP's has a MAP head, CLIP's a class token."""
  return "siglip_vision_model" if vision.pooling == "map" else "clip_vision_model"


def config_from_transformers(config: dict, *, source: str = "config.json", dtype: Any = None,
                             attention_impl: Optional[str] = None) -> LlavaConfig:
  """Our `LlavaConfig` for a transformers LlavaConfig dict; what it cannot express is a one-line WeightsError."""
  vision = config.get("vision_config") or _DEFAULT_VISION
  kind = vision.get("model_type", "clip_vision_model")
  if kind not in _TOWERS:
    raise WeightsError(f"{source}: vision tower {kind!r} is not supported, only {' or '.join(_TOWERS)}")
  text = config.get("text_config")
  if not text:
    raise WeightsError(f"{source}: config.json has no text_config")
  if text.get("model_type") not in _TEXT_TYPES:
    raise WeightsError(f"{source}: language model {text.get('model_type')!r} is not supported, only "
                       f"{' or '.join(_TEXT_TYPES)}")
  layer = config.get("vision_feature_layer", -2)
  if not isinstance(layer, int):
    raise WeightsError(f"{source}: vision_feature_layer {layer!r} is not supported (one layer index only, not a "
                       "list of layers to concatenate)")
  image_token = config.get("image_token_id", config.get("image_token_index"))  # transformers 5 / 4 names
  # transformers ties the head when either level says so (the composite config inherits the text config's flag).
  tie = bool(config.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
  extra = dict(dtype=dtype, attention_impl=attention_impl)
  try:
    return LlavaConfig(
        vision=_TOWERS[kind].config_from(vision, source=source, **extra),
        text=llama.config_from_transformers(text, source=source, tie_embeddings=tie, **extra),
        image_token_id=32000 if image_token is None else int(image_token), projector="mlp2x_gelu",
        projector_act=clip.act_from_transformers(config.get("projector_hidden_act", "gelu"), source),
        projector_bias=bool(config.get("multimodal_projector_bias", True)), feature_layer=layer,
        feature_select=config.get("vision_feature_select_strategy", "default"))
  except WeightsError:
    raise
  except ValueError as e:  # LlavaConfig's own checks (feature layer, strategy, image token id)
    raise WeightsError(f"{source}: {e}") from None


# (checkpoint prefix, part, the part's own prefix), first match wins: the head before the rest of the language model.
_PARTS = (("vision_tower.", "vision", ""), ("multi_modal_projector.", "projector", ""),
          ("language_model.lm_head.", "text", "lm_head."), ("language_model.model.", "text", "model."),
          ("language_model.", "text", "model."), ("lm_head.", "text", "lm_head."))


def _part(key: str) -> tuple[str, str]:
  """A checkpoint key -> (part, key as that part's own loader reads it): ('vision', CLIP key), ('projector',
  'linear_1.weight'), ('text', LlamaForCausalLM key); ('', key) for a key of no part."""
  if key.startswith("model.") and key.split(".")[1] in ("vision_tower", "multi_modal_projector", "language_model"):
    key = key[len("model."):]
  for prefix, part, new in _PARTS:
    if key.startswith(prefix):
      return part, new + key[len(prefix):]
  return "", key


def _projector_key(path: str) -> tuple[str, str]:
  """Our projector path (`linear_1.kernel`) -> (its key under multi_modal_projector, layout)."""
  name, leaf = path.rsplit(".", 1)
  return f"{name}.{'weight' if leaf == 'kernel' else leaf}", "linear" if leaf == "kernel" else "same"


def assign_transformers(model: LlavaModel, state: dict[str, np.ndarray], source: str) -> None:
  """Fills `model` from a LlavaForConditionalGeneration state dict (either layout); every weight used exactly
  once, or a one-line error naming the part it concerns."""
  parts: dict[str, dict[str, np.ndarray]] = {"vision": {}, "projector": {}, "text": {}, "": {}}
  for key, value in state.items():
    part, name = _part(key)
    parts[part][name if part else key] = value
  if parts[""]:
    raise WeightsError(f"{source} has {len(parts[''])} weights the model does not use, e.g. {sorted(parts[''])[:3]}")
  tower = _TOWERS[_tower_type(model.config.vision)]
  tower.assign(model.vision_model, parts["vision"], f"{source} (vision tower)")
  llama.assign_transformers(model.language_model, parts["text"], source=f"{source} (language model)")
  projector, arrays = parts["projector"], {}
  for path, var in nnx.state(model.projector, nnx.Param).flat_state():
    path = ".".join(str(p) for p in path)
    key, layout = _projector_key(path)
    value = take(projector, key, f"{source} (multi_modal_projector)")
    want = torch_shape(var.value.shape, layout)
    if value.shape != want:
      raise WeightsError(f"{source}: weight multi_modal_projector.{key} has shape {tuple(value.shape)}, the model "
                         f"expects {tuple(want)}")
    arrays[path] = from_torch(value, layout)
  if projector:
    raise WeightsError(f"{source} has {len(projector)} projector weights the model does not use, e.g. "
                       f"{['multi_modal_projector.' + k for k in sorted(projector)[:3]]}")
  assign(model.projector, arrays, source=source)
  nnx.update(model.projector, jax.tree.map(jnp.asarray, nnx.state(model.projector)))


@register_loader("LlavaForConditionalGeneration")
def load_transformers(folder: str, config: dict, *, allow_pickle: bool = False, dtype: Any = None,
                      attention_impl: Optional[str] = None) -> LlavaModel:
  """The `LlavaModel` a transformers LLaVA folder holds; `dtype` is the compute dtype (parameters stay float32).

  `vlm(input_ids, pixels NHWC)` gives float32 logits; `vlm.generate(input_ids, pixels, max_new_tokens=N)` greedy
  continuations that stop on nothing unless `stop_tokens` is passed (`pretrained.llama.generation_defaults(folder)`
  has the folder's end tokens). The images are normalised as the folder's preprocessor_config.json says
  (`pipelines.image_processor.ImageProcessor`).
  """
  cfg = config_from_transformers(config, source=folder, dtype=dtype, attention_impl=attention_impl)
  model = abstract_model(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0)))  # shapes only: the weights come from the file
  assign_transformers(model, read_folder(folder, allow_pickle=allow_pickle), source=folder)
  return model


def transformers_config(cfg: LlavaConfig) -> dict:
  """config.json of transformers' LlavaForConditionalGeneration for `cfg`; a ValueError for what it lacks (a
  single-matrix projector, a tower neither CLIP nor SigLIP can hold, a language model neither Llama nor Qwen2)."""
  if cfg.projector != "mlp2x_gelu":
    raise ValueError(f"transformers' LLaVA projector has two layers; this model's projector is {cfg.projector!r}")
  text = llama.transformers_config(cfg.text)
  del text["architectures"], text["dtype"]
  return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
          "vision_config": _TOWERS[_tower_type(cfg.vision)].config_to(cfg.vision), "text_config": text,
          "image_token_index": cfg.image_token_id, "image_seq_length": cfg.num_image_tokens,
          "projector_hidden_act": clip.act_to_transformers(cfg.projector_act),
          "multimodal_projector_bias": cfg.projector_bias, "vision_feature_layer": cfg.feature_layer,
          "vision_feature_select_strategy": cfg.feature_select, "tie_word_embeddings": cfg.text.tie_embeddings,
          "dtype": "float32"}


def save_transformers(model: LlavaModel, folder: str) -> None:
  """Writes config.json + model.safetensors in the layout transformers 5's own save_pretrained writes."""
  config = transformers_config(model.config)
  state = {}
  for key, value in _TOWERS[_tower_type(model.config.vision)].state(model.vision_model).items():
    state["vision_tower." + key.removeprefix("vision_model.")] = value
  for path, value in model_arrays(model.projector).items():
    key, layout = _projector_key(path)
    state["multi_modal_projector." + key] = to_torch(value.astype(np.float32), layout)
  for key, value in llama.transformers_state(model.language_model).items():
    state["language_model." + key] = value  # model.* -> language_model.model.*, lm_head -> language_model.lm_head
  os.makedirs(folder, exist_ok=True)
  save_safetensors(state, os.path.join(folder, "model.safetensors"))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
