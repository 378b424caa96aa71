"""SigLIP weights in and out: transformers `SiglipModel` / `SiglipVisionModel` folders and export back.

  siglip = pretrained.load("siglip-base-patch16-224")     # models.clip.CLIPModel, projections='siglip'
  tower = pretrained.load("siglip-so400m-vision")         # a SiglipVisionModel folder: models.vit.CLIPVisionModel
  save_transformers(siglip, "out/")                        # transformers.SiglipModel.from_pretrained("out/") reads it

SigLIP is CLIP's architecture with a few switches (`models.clip`): a bidirectional text tower pooled at the last
position and projected by a linear map with a bias (transformers' `text_model.head`), a ViT without class token or
pre-norm whose patch convolution has a bias, pooled by a MAP head whose output is the image embedding, and a
learnt logit bias. The keys are CLIP's (`pretrained.clip.hf_key`) but for the heads, so this module renames those,
splits the MAP head's fused torch `nn.MultiheadAttention` projection into our query/key/value, and reuses CLIP's
checked assignment and export.

transformers' `SiglipVisionModel.last_hidden_state` is post-layer-normed; our tower returns the raw last block, as
for CLIP (`hidden_states[-1]`), so it equals `tower.post_layernorm(hidden_states)`. `skip_last_layers=k` gives
transformers' `hidden_states[-1 - k]` (LLaVA reads k=1). transformers only interpolates position embeddings when
asked (`interpolate_pos_encoding=True`), and otherwise fails on other image sizes; ours always interpolates (see
`models.vit.interpolate_posemb` for how the two kernels differ).
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional, Union

import numpy as np
from flax import nnx

from diffusion_jax.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionModel
from diffusion_jax.models.tracing import abstract_model
from diffusion_jax.models.vit import CLIPVisionConfig
from diffusion_jax.pretrained import class_name_of, clip, register_loader
from diffusion_jax.pretrained.clip import (block_to_transformers, config_get, hf_key, split_in_proj, sub_config,
                                           text_config_from_transformers, vision_config_from_transformers,
                                           vision_input_to_transformers, with_defaults, write_transformers)
from diffusion_jax.pretrained.weights import WeightsError, read_folder

__all__ = ["assign_transformers", "load_transformers", "save_transformers", "text_config", "transformers_state",
           "vision_config", "vision_config_to_transformers"]

# transformers' SigLIP defaults (google/siglip-base-patch16-224), for what a saved config leaves out.
SIGLIP_TEXT_DEFAULTS = {"vocab_size": 32000, "max_position_embeddings": 64, "hidden_size": 768,
                        "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                        "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "eos_token_id": 49407,
                        "pad_token_id": 1}
SIGLIP_VISION_DEFAULTS = {"image_size": 224, "patch_size": 16, "num_channels": 3, "hidden_size": 768,
                          "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                          "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "vision_use_head": True}
# The scalars' shape in transformers' checkpoints; ours are 0-d.
_SCALARS = ("logit_scale", "logit_bias")
_HEAD_ATTENTION = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "out_proj"}
# Our paths renamed into transformers' CLIP-like naming before `hf_key` finishes the job.
_RENAMES = (
    (re.compile(r"^text_projection\."), "text_model.head."),
    (re.compile(r"\.head\.attention\.(query|key|value|out)\."), lambda m: f".head.attention.{_HEAD_ATTENTION[m[1]]}."),
    (re.compile(r"\.head\.layer_norm\."), ".head.layernorm."),
)
# A bare SiglipVisionModel's keys start at `head.`, the others' at `vision_model.head.`.
_FUSED = re.compile(r"^((?:.*\.)?head\.attention\.)in_proj_(weight|bias)$")


def siglip_key(path: str) -> tuple[str, str]:
  """Our dotted parameter path -> (transformers SigLIP key, layout), as `pretrained.clip.hf_key` does for CLIP."""
  for pattern, repl in _RENAMES:
    path = pattern.sub(repl, path)
  return hf_key(path)


def _split_fused(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The MAP head's fused `in_proj_*` split into q/k/v projections, and the [1]-shaped scalars made 0-d."""
  out = {}
  for key, value in state.items():
    m = _FUSED.match(key)
    if m:
      out.update(split_in_proj(m[1], m[2], value))
    elif key in _SCALARS:
      out[key] = np.asarray(value).reshape(())
    else:
      out[key] = value
  return out


def _fuse(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The inverse of `_split_fused`: what transformers' SigLIP state dict holds."""
  out = {}
  for key, value in state.items():
    m = re.match(r"^(.*\.head\.attention\.)q_proj\.(weight|bias)$", key)
    if m:
      out[f"{m[1]}in_proj_{m[2]}"] = np.concatenate([state[f"{m[1]}{n}_proj.{m[2]}"] for n in "qkv"], axis=0)
    elif re.match(r"^.*\.head\.attention\.[kv]_proj\.", key) is None:
      out[key] = value.reshape(1) if key in _SCALARS else value
  return out


def assign_transformers(model: Union[CLIPModel, CLIPVisionModel], state: dict[str, np.ndarray], source: str) -> None:
  """Fills a SigLIP `CLIPModel` or vision tower (alone, or LLaVA's) from transformers' SigLIP state dict, keys with
  or without `vision_model.`: the MAP head's fused projection split, then `pretrained.clip.assign_transformers`."""
  clip.assign_transformers(model, _split_fused(state), source, key=siglip_key)


def transformers_state(model: Union[CLIPModel, CLIPVisionModel]) -> dict[str, np.ndarray]:
  """The inverse of `assign_transformers`: transformers' SigLIP state dict (float32, MAP head fused), a bare tower's
  keys under `vision_model.` as `pretrained.clip.transformers_state` writes them."""
  return _fuse(clip.transformers_state(model, key=siglip_key))


def text_config(d: dict, *, source: str = "config.json", **overrides) -> CLIPTextConfig:
  """Our text config from a transformers `SiglipTextConfig` dict: not causal, pooled at the last position."""
  return text_config_from_transformers(d, source=source, defaults=SIGLIP_TEXT_DEFAULTS,
                                       **{"pooling": "last", "causal": False, **overrides})


def vision_config(d: dict, *, source: str = "config.json", **overrides) -> CLIPVisionConfig:
  """Our vision config from a transformers `SiglipVisionConfig` dict: MAP head, no pre-norm, patch bias."""
  if not with_defaults(d, SIGLIP_VISION_DEFAULTS)["vision_use_head"]:
    raise WeightsError(f"{source}: SigLIP vision towers without a head (vision_use_head=false) are not supported")
  return vision_config_from_transformers(d, source=source, defaults=SIGLIP_VISION_DEFAULTS,
                                         **{"pooling": "map", "pre_norm": False, "patch_bias": True, **overrides})


@register_loader("SiglipModel", "SiglipVisionModel")
def load_transformers(folder: str, config: dict, *, allow_pickle: bool = False, dtype: Any = None,
                      attention_impl: Optional[str] = None) -> Union[CLIPModel, CLIPVisionModel]:
  """A transformers SigLIP folder as `models.clip.CLIPModel` (SiglipModel: `encode_image`, `encode_text`,
  `logits`, `logit_scale`, `logit_bias`) or `models.vit.CLIPVisionModel` (SiglipVisionModel).

  `dtype` is the compute dtype (parameters stay float32).
  """
  extra = dict(dtype=dtype, attention_impl=attention_impl)
  if class_name_of(config) == "SiglipModel":
    text_d = sub_config(config, "text")
    text = text_config(text_d, source=folder, **extra)
    vision = vision_config(sub_config(config, "vision"), source=folder, **extra)
    embed_dim = config_get(text_d, "projection_size", text.width)
    if embed_dim != vision.width:
      raise WeightsError(f"{folder}: text projection_size {embed_dim} differs from the vision width {vision.width}, "
                         "so image and text embeddings cannot be compared")
    # The init values only shape the model; the checkpoint's values replace them.
    cfg = CLIPConfig(text=text, vision=vision, embed_dim=embed_dim, logit_scale_init=math.log(10.0),
                     logit_bias_init=-10.0, projections="siglip")
    build = lambda: CLIPModel(cfg, rngs=nnx.Rngs(0))
  else:
    cfg = vision_config(config, source=folder, **extra)
    build = lambda: CLIPVisionModel(cfg, rngs=nnx.Rngs(0))
  model = abstract_model(build)  # shapes only: the weights come from the file
  assign_transformers(model, read_folder(folder, allow_pickle=allow_pickle), folder)
  return model


def _text_to_transformers(cfg: CLIPTextConfig, projection_size: int) -> dict:
  if cfg.pooling != "last" or cfg.causal:
    raise ValueError(f"transformers' SiglipTextModel is bidirectional and pools the last position; this tower has "
                     f"pooling {cfg.pooling!r} and causal={cfg.causal}")
  return {"model_type": "siglip_text_model", "vocab_size": cfg.vocab_size,
          "max_position_embeddings": cfg.context_length, "projection_size": projection_size,
          "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id, "bos_token_id": None,
          **block_to_transformers(cfg)}


def vision_config_to_transformers(cfg: CLIPVisionConfig) -> dict:
  """transformers' SiglipVisionConfig dict of our tower (also LLaVA's `vision_config`); a ValueError for a tower
  transformers' SigLIP cannot hold."""
  if cfg.pooling != "map" or cfg.pre_norm or not cfg.patch_bias:
    raise ValueError(f"transformers' SiglipVisionModel has a MAP head, no pre-norm and a patch bias; this tower has "
                     f"pooling {cfg.pooling!r}, pre_norm={cfg.pre_norm} and patch_bias={cfg.patch_bias}")
  return {"model_type": "siglip_vision_model", "vision_use_head": True, **vision_input_to_transformers(cfg),
          **block_to_transformers(cfg)}


def save_transformers(model: Union[CLIPModel, CLIPVisionModel], folder: str) -> None:
  """Writes `config.json` + `model.safetensors` that transformers' SiglipModel (for a `CLIPModel`) or
  SiglipVisionModel (for a `CLIPVisionModel`) loads; what SigLIP cannot express is a ValueError naming it."""
  if isinstance(model, CLIPModel):
    cfg = model.config
    if cfg.projections != "siglip" or cfg.logit_bias_init is None:
      raise ValueError(f"transformers' SiglipModel has SigLIP's projections and a logit bias; this model has "
                       f"projections {cfg.projections!r} and logit_bias_init={cfg.logit_bias_init}")
    config = {"architectures": ["SiglipModel"], "model_type": "siglip",
              "text_config": _text_to_transformers(cfg.text, cfg.embed_dim),
              "vision_config": vision_config_to_transformers(cfg.vision)}
  elif isinstance(model, CLIPVisionModel):
    config = {"architectures": ["SiglipVisionModel"], **vision_config_to_transformers(model.config)}
  else:
    raise TypeError(f"siglip.save_transformers takes a models.clip.CLIPModel or CLIPVisionModel, got "
                    f"{type(model).__name__}")
  write_transformers(folder, config, transformers_state(model))
