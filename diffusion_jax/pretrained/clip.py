"""CLIP weights in and out: transformers folders, OpenAI / open_clip state dicts, and export back to transformers.

  model = pretrained.load("clip-vit-large-patch14")          # any transformers CLIP* folder (see `load_transformers`)
  model = load_openai_state_dict("ViT-B-32.pt", allow_pickle=True)
  save_transformers(model, "out/")                           # transformers.CLIPModel.from_pretrained("out/") reads it

Our modules use transformers' names outside the shared transformer blocks, so a transformers key maps to our
parameter path by a few renames and a transpose (`hf_key`). OpenAI's layout is first rewritten into transformers'
(`openai_to_transformers`: split the fused q/k/v projection, transpose the `x @ proj` matrices), so both formats
share one checked mapping.
"""
from __future__ import annotations

import json
import math
import os
import re
import zipfile
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.models.clip import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel,
                                       CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModel,
                                       CLIPVisionModelWithProjection)
from diffusion_jax.models.tracing import abstract_model
from diffusion_jax.pretrained import class_name_of, register_loader
from diffusion_jax.pretrained.weights import (WeightsError, assign, from_torch, model_arrays, read_file, read_folder,
                                              save_safetensors, take, to_torch, torch_shape)

__all__ = ["load_transformers", "load_openai_state_dict", "openai_to_transformers", "save_transformers",
           "text_config_from_transformers", "vision_config_from_transformers"]

_ACT_FROM_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "silu": "silu"}
_ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"}
# Buffers older transformers versions saved with the weights; they are not parameters.
_IGNORED = re.compile(r"(^|\.)position_ids$")

AnyCLIP = Union[CLIPModel, CLIPTextModel, CLIPVisionModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection]


# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------

def act_from_transformers(name: str, source: str) -> str:
  """Our activation name for a transformers `hidden_act` (also LLaVA's `projector_hidden_act`)."""
  if name not in _ACT_FROM_HF:
    raise WeightsError(f"{source}: hidden_act {name!r} is not supported (known: {', '.join(_ACT_FROM_HF)})")
  return _ACT_FROM_HF[name]


def act_to_transformers(name: str) -> str:
  if name not in _ACT_TO_HF:
    raise ValueError(f"activation {name!r} has no transformers name (known: {', '.join(_ACT_TO_HF)})")
  return _ACT_TO_HF[name]


def _square(value: Any, what: str, source: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise WeightsError(f"{source}: non-square {what} {list(value)} is not supported")
    value = value[0]
  return int(value)


def config_get(d: dict, key: str, default: Any) -> Any:
  """d[key], with transformers' default where the key is absent or null (configs are saved as diffs)."""
  value = d.get(key)
  return default if value is None else value


# transformers' defaults for what a saved config may leave out, per model family (SigLIP's differ: see
# pretrained/siglip.py).
CLIP_TEXT_DEFAULTS = {"vocab_size": 49408, "max_position_embeddings": 77, "hidden_size": 512, "num_hidden_layers": 12,
                      "num_attention_heads": 8, "intermediate_size": 2048, "hidden_act": "quick_gelu",
                      "layer_norm_eps": 1e-5, "eos_token_id": 49407, "pad_token_id": 0}
CLIP_VISION_DEFAULTS = {"image_size": 224, "patch_size": 32, "num_channels": 3, "hidden_size": 768,
                        "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


def with_defaults(d: dict, defaults: Mapping[str, Any]) -> dict:
  """`d` with `defaults` filled in where a key is absent or null."""
  return {**defaults, **{k: v for k, v in d.items() if v is not None}}


def _block_from_transformers(d: dict, source: str) -> dict:
  """The fields of a tower config that describe its blocks, which CLIP and SigLIP configs spell alike."""
  return dict(width=d["hidden_size"], layers=d["num_hidden_layers"], heads=d["num_attention_heads"],
              mlp_dim=d["intermediate_size"], act=act_from_transformers(d["hidden_act"], source), layer_norm_eps=d["layer_norm_eps"])


def text_config_from_transformers(d: dict, *, source: str = "config.json",
                                  defaults: Mapping[str, Any] = CLIP_TEXT_DEFAULTS, **overrides) -> CLIPTextConfig:
  """Our text config from a transformers `CLIPTextConfig` dict (with SigLIP's `defaults`, a `SiglipTextConfig`'s);
  eos_token_id == 2 means argmax pooling."""
  d = with_defaults(d, defaults)
  eos, vocab = d["eos_token_id"], d["vocab_size"]
  if isinstance(eos, (list, tuple)):
    raise WeightsError(f"{source}: a list of eos_token_id {eos} is not supported")
  fields = dict(vocab_size=vocab, context_length=d["max_position_embeddings"],
                # transformers' legacy rule, kept for the OpenAI configs that still say 2: the EOS token is the
                # largest id, so pool at the argmax; the real EOS id is then the last of the vocabulary.
                pooling="argmax" if eos == 2 else "eos", eos_token_id=vocab - 1 if eos == 2 else eos,
                pad_token_id=d["pad_token_id"], **_block_from_transformers(d, source))
  fields.update(overrides)
  return CLIPTextConfig(**fields)


def vision_config_from_transformers(d: dict, *, source: str = "config.json",
                                    defaults: Mapping[str, Any] = CLIP_VISION_DEFAULTS,
                                    **overrides) -> CLIPVisionConfig:
  d = with_defaults(d, defaults)
  fields = dict(image_size=_square(d["image_size"], "image_size", source),
                patch_size=_square(d["patch_size"], "patch_size", source), channels=d["num_channels"],
                **_block_from_transformers(d, source))
  fields.update(overrides)
  return CLIPVisionConfig(**fields)


def sub_config(config: dict, name: str) -> dict:
  # Configs saved by old transformers versions may carry the `*_config_dict` form, which wins when both are present.
  sub = dict(config.get(f"{name}_config") or {})
  sub.update(config.get(f"{name}_config_dict") or {})
  return sub


def block_to_transformers(cfg: Union[CLIPTextConfig, CLIPVisionConfig]) -> dict:
  """The block fields of a tower's transformers config (the inverse of `_block_from_transformers`)."""
  return {"hidden_size": cfg.width, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
          "intermediate_size": cfg.mlp_dim, "hidden_act": act_to_transformers(cfg.act), "layer_norm_eps": cfg.layer_norm_eps}


def _text_to_transformers(cfg: CLIPTextConfig, projection_dim: int) -> dict:
  if cfg.pooling not in ("argmax", "eos") or not cfg.causal:
    raise ValueError(f"transformers' CLIPTextModel is causal and pools with 'argmax' or 'eos'; this tower has "
                     f"pooling {cfg.pooling!r} and causal={cfg.causal}")
  if cfg.pooling == "eos" and cfg.eos_token_id == 2:
    raise ValueError("eos_token_id 2 means argmax pooling to transformers; 'eos' pooling cannot be exported with it")
  argmax = cfg.pooling == "argmax"
  return {
      "model_type": "clip_text_model", "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.context_length,
      **block_to_transformers(cfg), "projection_dim": projection_dim,
      # OpenAI's published configs say bos 0 / eos 2 / pad 1; eos 2 is what selects argmax pooling.
      "eos_token_id": 2 if argmax else cfg.eos_token_id, "bos_token_id": 0 if argmax else None,
      "pad_token_id": 1 if argmax else cfg.pad_token_id,
  }


def vision_config_to_transformers(cfg: CLIPVisionConfig, projection_dim: int = 512) -> dict:
  """transformers' CLIPVisionConfig dict of our tower (also LLaVA's `vision_config`); a ValueError for a tower
  transformers' CLIP cannot hold."""
  if cfg.pooling != "cls" or not cfg.pre_norm or cfg.patch_bias:
    raise ValueError(f"transformers' CLIPVisionModel has a class token, a pre-norm and no patch bias; this tower has "
                     f"pooling {cfg.pooling!r}, pre_norm={cfg.pre_norm} and patch_bias={cfg.patch_bias}")
  return {"model_type": "clip_vision_model", **vision_input_to_transformers(cfg), **block_to_transformers(cfg),
          "projection_dim": projection_dim}


def vision_input_to_transformers(cfg: CLIPVisionConfig) -> dict:
  return {"image_size": cfg.image_size, "patch_size": cfg.patch_size, "num_channels": cfg.channels}


# ---------------------------------------------------------------------------------------------------------------
# Parameter names
# ---------------------------------------------------------------------------------------------------------------

# Our block's names (models/transformer.py) against transformers' CLIPEncoderLayer's.
_HF_BLOCK = {"attn_norm": "layer_norm1", "mlp_norm": "layer_norm2", "attn.query": "self_attn.q_proj",
             "attn.key": "self_attn.k_proj", "attn.value": "self_attn.v_proj", "attn.out": "self_attn.out_proj"}
_RENAMES = (
    (re.compile(r"^(text_model|vision_model)\.layers\.(\d+)\.(attn_norm|mlp_norm|attn\.\w+)\."),
     lambda m: f"{m[1]}.layers.{m[2]}.{_HF_BLOCK[m[3]]}."),
    (re.compile(r"^(text_model|vision_model)\.layers\."), r"\1.encoder.layers."),
    (re.compile(r"token_embedding\.embedding$"), "embeddings.token_embedding.weight"),
    (re.compile(r"^(text_model|vision_model)\.position_embedding$"), r"\1.embeddings.position_embedding.weight"),
    (re.compile(r"class_embedding$"), "embeddings.class_embedding"),
    (re.compile(r"patch_embedding\.(kernel|bias)$"), r"embeddings.patch_embedding.\1"),  # .kernel -> .weight below
    (re.compile(r"pre_layernorm\."), "pre_layrnorm."),  # transformers' spelling
    (re.compile(r"\.(kernel|scale)$"), ".weight"),
)


def hf_key(path: str) -> tuple[str, str]:
  """Our dotted parameter path -> (transformers key, layout as `weights.from_torch` takes it)."""
  if path.endswith("patch_embedding.kernel"):
    layout = "conv"
  elif path.endswith(".kernel"):
    layout = "linear"
  else:
    layout = "same"
  key = path
  for pattern, repl in _RENAMES:
    key = pattern.sub(repl, key)
  return key, layout


def tower_prefix(model: nnx.Module) -> str:
  """What our paths need in front to read as transformers keys: the bare towers sit under text_/vision_model."""
  if isinstance(model, CLIPTextModel):
    return "text_model."
  if isinstance(model, CLIPVisionModel):
    return "vision_model."
  return ""


def assign_transformers(model: nnx.Module, state: dict[str, np.ndarray], source: str,
                        key: Callable[[str], tuple[str, str]] = hf_key) -> None:
  """Fills `model` from a transformers-layout state dict; every key used exactly once, or a one-line error.

  `key` maps our dotted path (with `tower_prefix` in front) to (transformers key, layout); SigLIP passes its own,
  which renames a few parameters and defers to `hf_key` for the rest.
  """
  state = {k: v for k, v in state.items() if not _IGNORED.search(k)}
  prefix = tower_prefix(model)
  if prefix and not any(k.startswith(prefix) for k in state):
    # transformers 5 saves the bare CLIPTextModel/CLIPVisionModel without the prefix older versions wrote.
    state = {prefix + k: v for k, v in state.items()}
  arrays = {}
  for path, var in nnx.state(model, nnx.Param).flat_state():
    path = ".".join(str(p) for p in path)
    name, layout = key(prefix + path)
    value = take(state, name, source)
    want = torch_shape(var.value.shape, layout)
    if value.shape != want:  # named by the checkpoint's key and layout, which is what the user can inspect
      raise WeightsError(f"{source}: weight {name} has shape {tuple(value.shape)}, the model expects {tuple(want)}")
    arrays[path] = from_torch(value, layout)
  if state:
    raise WeightsError(f"{source} has {len(state)} weights the model does not use, e.g. {sorted(state)[:3]}")
  assign(model, arrays, source=source)
  # assign leaves numpy arrays in place; hold device arrays like a freshly initialised model does.
  nnx.update(model, jax.tree.map(jnp.asarray, nnx.state(model)))


def _abstract(build) -> nnx.Module:
  # Shapes only: the weights come from the file, so random initialisation would be wasted time and memory.
  return abstract_model(build)


# ---------------------------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------------------------

@register_loader("CLIPModel", "CLIPTextModel", "CLIPVisionModel", "CLIPTextModelWithProjection",
                 "CLIPVisionModelWithProjection")
def load_transformers(folder: str, config: dict, *, allow_pickle: bool = False, dtype: Any = None,
                      attention_impl: Optional[str] = None) -> AnyCLIP:
  """The model a transformers CLIP folder holds, as the NNX class of the same name in `models.clip`.

  CLIPModel -> `CLIPModel`; CLIPTextModel / CLIPVisionModel -> the bare tower; CLIPTextModelWithProjection /
  CLIPVisionModelWithProjection -> `models.clip.CLIPTextModelWithProjection` / `CLIPVisionModelWithProjection`
  (`.text_model` + `.text_projection`, `encode_text`; `.vision_model` + `.visual_projection`, `encode_image`).
  `dtype` is the compute dtype (parameters stay float32).
  """
  name = class_name_of(config)
  extra = dict(dtype=dtype, attention_impl=attention_impl)
  if name == "CLIPModel":
    cfg = CLIPConfig(
        text=text_config_from_transformers(sub_config(config, "text"), source=folder, **extra),
        vision=vision_config_from_transformers(sub_config(config, "vision"), source=folder, **extra),
        embed_dim=config_get(config, "projection_dim", 512),
        logit_scale_init=config_get(config, "logit_scale_init_value", 2.6592))
    build = lambda: CLIPModel(cfg, rngs=nnx.Rngs(0))
  elif name.startswith("CLIPText"):
    cfg = text_config_from_transformers(config, source=folder, **extra)
    if name.endswith("WithProjection"):
      build = lambda: CLIPTextModelWithProjection(cfg, config_get(config, "projection_dim", 512), rngs=nnx.Rngs(0))
    else:
      build = lambda: CLIPTextModel(cfg, rngs=nnx.Rngs(0))
  else:
    cfg = vision_config_from_transformers(config, source=folder, **extra)
    if name.endswith("WithProjection"):
      build = lambda: CLIPVisionModelWithProjection(cfg, config_get(config, "projection_dim", 512), rngs=nnx.Rngs(0))
    else:
      build = lambda: CLIPVisionModel(cfg, rngs=nnx.Rngs(0))
  model = _abstract(build)
  assign_transformers(model, read_folder(folder, allow_pickle=allow_pickle), source=folder)
  return model


def save_transformers(model: AnyCLIP, folder: str) -> None:
  """Writes `config.json` + `model.safetensors` that transformers' class of the same name loads.

  Only what transformers' CLIP can express is exported: 'argmax' or 'eos' text pooling, a class-token ViT with a
  pre-norm, no logit bias; anything else is a ValueError naming it.
  """
  if isinstance(model, CLIPModel):
    cfg = model.config
    if cfg.projections != "clip":
      raise ValueError(f"transformers' CLIPModel has CLIP's projections; this model has {cfg.projections!r} "
                       "(pretrained.siglip.save_transformers exports SigLIP)")
    if cfg.logit_bias_init is not None:
      raise ValueError("transformers' CLIPModel has no logit_bias; this model was configured with one")
    config = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
              "logit_scale_init_value": cfg.logit_scale_init,
              "text_config": _text_to_transformers(cfg.text, cfg.embed_dim),
              "vision_config": vision_config_to_transformers(cfg.vision, cfg.embed_dim)}
  elif isinstance(model, (CLIPTextModel, CLIPTextModelWithProjection)):
    dim = model.text_projection.kernel.shape[1] if isinstance(model, CLIPTextModelWithProjection) else 512
    config = {"architectures": [type(model).__name__], **_text_to_transformers(model.config, dim)}
  elif isinstance(model, (CLIPVisionModel, CLIPVisionModelWithProjection)):
    dim = model.visual_projection.kernel.shape[1] if isinstance(model, CLIPVisionModelWithProjection) else 512
    config = {"architectures": [type(model).__name__], **vision_config_to_transformers(model.config, dim)}
  else:
    raise TypeError(f"save_transformers takes a models.clip model, got {type(model).__name__}")
  write_transformers(folder, config, transformers_state(model))


def transformers_state(model: nnx.Module, key: Callable[[str], tuple[str, str]] = hf_key) -> dict[str, np.ndarray]:
  """The model's parameters as a float32 transformers state dict (the inverse of `assign_transformers`)."""
  prefix = tower_prefix(model)
  state = {}
  for path, value in model_arrays(model).items():
    name, layout = key(prefix + path)
    state[name] = to_torch(value.astype(np.float32), layout)
  return state


def write_transformers(folder: str, config: dict, state: Mapping[str, np.ndarray]) -> None:
  """`config.json` (float32) + `model.safetensors`, the two files transformers' `from_pretrained` reads."""
  os.makedirs(folder, exist_ok=True)
  save_safetensors(state, os.path.join(folder, "model.safetensors"))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({**config, "dtype": "float32"}, f, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------------------------
# OpenAI / open_clip
# ---------------------------------------------------------------------------------------------------------------

_OPENAI_BLOCK = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("attn.out_proj.", "self_attn.out_proj."),
                 ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."))
_OPENAI_TOP = (("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
               ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
               ("ln_final.", "text_model.final_layer_norm."),
               ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
               ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
               ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
               ("visual.ln_pre.", "vision_model.pre_layrnorm."), ("visual.ln_post.", "vision_model.post_layernorm."))
# Entries of OpenAI's TorchScript state dicts that describe the model rather than weigh it.
_OPENAI_META = ("input_resolution", "context_length", "vocab_size")


def split_in_proj(prefix: str, kind: str, value: np.ndarray) -> dict[str, np.ndarray]:
  """torch's fused `in_proj_{kind}` (q, k, v stacked on the output axis) as `{prefix}{q,k,v}_proj.{kind}`."""
  return {f"{prefix}{name}_proj.{kind}": part for name, part in zip("qkv", np.split(value, 3, axis=0))}


def openai_to_transformers(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames an OpenAI/open_clip CLIP state dict into transformers' CLIPModel layout.

  The fused `attn.in_proj_*` (q, k, v stacked on the output axis) is split, and `text_projection`/`visual.proj`,
  stored as [width, embed] for `x @ proj`, become Linear weights [embed, width]. Keys it does not know keep their
  names, so the strict assignment afterwards reports them.
  """
  out = {}
  for key, value in state.items():
    m = re.match(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.*)$", key)
    if m:
      tower = "vision_model" if m.group(1) else "text_model"
      base, rest = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
      if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        out.update(split_in_proj(f"{base}self_attn.", rest.rsplit("_", 1)[1], value))
        continue
      for old, new in _OPENAI_BLOCK:
        if rest.startswith(old):
          rest = new + rest[len(old):]
          break
      out[base + rest] = value
      continue
    if key == "text_projection" and value.ndim == 2:
      out["text_projection.weight"] = value.T
      continue
    if key == "visual.proj":
      out["visual_projection.weight"] = value.T
      continue
    for old, new in _OPENAI_TOP:
      if key.startswith(old):
        key = new + key[len(old):]
        break
    out[key] = value
  return out


def _is_torchscript(path: str) -> bool:
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any("/code/" in n for n in z.namelist())  # TorchScript archives carry their compiled code


def _read_openai(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
  # OpenAI's own downloads are TorchScript archives, which torch.load(weights_only=True) refuses; torch.jit.load
  # unpickles too, so it is as much behind allow_pickle as any pickle file.
  if not (allow_pickle and os.path.isfile(path) and _is_torchscript(path)):
    return read_file(path, allow_pickle=allow_pickle)
  import torch
  try:
    module = torch.jit.load(path, map_location="cpu")
  except Exception as e:  # noqa: BLE001
    raise WeightsError(f"cannot read TorchScript archive {path}: {str(e).splitlines()[0]}") from None
  return _as_numpy(module.state_dict())


def _as_numpy(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  out = {}
  for key, value in state.items():
    if hasattr(value, "detach"):  # a torch tensor
      value = value.detach().cpu()
      value = value.float().numpy() if value.is_floating_point() else value.numpy()
    out[key] = np.asarray(value)
  return out


def _count_blocks(state: Mapping[str, Any], prefix: str) -> int:
  return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def load_openai_state_dict(path_or_state_dict: Union[str, Mapping[str, Any]], *, allow_pickle: bool = False,
                           quick_gelu: bool = True, text_heads: Optional[int] = None,
                           vision_heads: Optional[int] = None, dtype: Any = None,
                           attention_impl: Optional[str] = None) -> CLIPModel:
  """A `CLIPModel` from an OpenAI or open_clip ViT CLIP state dict (a file, or a dict of arrays / torch tensors).

  The architecture is read off the shapes as open_clip's `build_model_from_openai_state_dict` does: 64-wide
  attention heads (pass text_heads / vision_heads for models whose heads are not, e.g. open_clip's ViT-g-14 image
  tower), MLP widths from the weights, argmax text pooling. OpenAI's models use quick_gelu; open_clip's own LAION
  models use GELU (`quick_gelu=False`). A `logit_bias` in the state dict (SigLIP-style training) is loaded too.
  """
  if isinstance(path_or_state_dict, (str, os.PathLike)):
    source = str(path_or_state_dict)
    state = _read_openai(source, allow_pickle)
  else:
    source = "state dict"
    state = _as_numpy(path_or_state_dict)
  state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}  # DDP checkpoints
  state = {k: v for k, v in state.items() if k not in _OPENAI_META and not k.endswith("attn_mask")}
  if "visual.proj" not in state:
    raise WeightsError(f"{source}: no visual.proj, so not a ViT CLIP (ResNet image towers are not supported)")

  def shape(key):
    if key not in state:
      raise WeightsError(f"{source} has no weight {key!r}")
    return state[key].shape

  act = "quick_gelu" if quick_gelu else "gelu"
  v_width, channels, patch = shape("visual.conv1.weight")[:3]
  grid = round(math.sqrt(shape("visual.positional_embedding")[0] - 1))
  vision = CLIPVisionConfig(
      image_size=patch * grid, patch_size=patch, channels=channels, width=v_width,
      layers=_count_blocks(state, "visual.transformer.resblocks."), heads=vision_heads or v_width // 64,
      mlp_dim=shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0], act=act, dtype=dtype,
      attention_impl=attention_impl)
  t_width = shape("ln_final.weight")[0]
  vocab = shape("token_embedding.weight")[0]
  text = CLIPTextConfig(
      vocab_size=vocab, context_length=shape("positional_embedding")[0], width=t_width,
      layers=_count_blocks(state, "transformer.resblocks."), heads=text_heads or t_width // 64,
      mlp_dim=shape("transformer.resblocks.0.mlp.c_fc.weight")[0], act=act, pooling="argmax",
      eos_token_id=vocab - 1, dtype=dtype, attention_impl=attention_impl)
  logit_bias = state.get("logit_bias")
  cfg = CLIPConfig(text=text, vision=vision, embed_dim=shape("text_projection")[1],
                   logit_bias_init=None if logit_bias is None else float(np.asarray(logit_bias).reshape(())))
  model = _abstract(lambda: CLIPModel(cfg, rngs=nnx.Rngs(0)))
  hf = openai_to_transformers(state)
  for key in ("logit_scale", "logit_bias"):
    if key in hf:
      hf[key] = np.asarray(hf[key]).reshape(())  # some checkpoints store the scalars as shape [1]
  assign_transformers(model, hf, source=source)
  return model
