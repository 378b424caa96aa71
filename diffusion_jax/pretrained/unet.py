"""diffusers `UNet2DConditionModel` folders (Stable Diffusion 1.x/2.x `unet/`) ↔ our NNX U-Net.

  unet = pretrained.load("stable-diffusion-v1-5/unet")     # or load_unet(folder, read_config(folder))
  eps = unet(latents_nhwc, t, text_states)

Our module tree mirrors diffusers', so a weight's name is its diffusers name with a few renames (our attention's
query/key/value/out, and diffusers keeps a dropout inside `to_out` and `ff.net`) and PyTorch's layouts turned into
Flax's: conv OIHW → HWIO, linear
(out, in) → (in, out), norm `weight` → `scale`. Every config field either maps onto `UNetConfig`, is irrelevant
at float32 inference (`upcast_attention`, `dropout`, `sample_size`), or must hold its plain-SD value; anything
else is a one-line `WeightsError` naming the field, so an SDXL-style or class-conditioned U-Net never loads
half right.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.models.unet import UNet2DConditionModel, UNetConfig
from diffusion_jax.models.tracing import abstract_model
from diffusion_jax.pretrained import register_loader
from diffusion_jax.pretrained.weights import (DIFFUSERS_ATTENTION, WeightsError, assign, from_torch, kernel_layout,
                                              model_arrays, read_config, read_folder, save_safetensors, to_torch)

__all__ = ["config_from_diffusers", "diffusers_config", "from_diffusers_state", "to_diffusers_state", "load_unet",
           "save_diffusers_unet"]

_CROSS_DOWN, _PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_CROSS_UP, _PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
_MID = "UNetMidBlock2DCrossAttn"

# diffusers' constructor defaults for the fields we map: old hub configs (SD 1.x) omit the newer ones.
_DEFAULTS = dict(
    in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=(_CROSS_DOWN, _CROSS_DOWN, _CROSS_DOWN, _PLAIN_DOWN), mid_block_type=_MID,
    up_block_types=(_PLAIN_UP, _CROSS_UP, _CROSS_UP, _CROSS_UP), block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2, norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1280, transformer_layers_per_block=1,
    attention_head_dim=8, num_attention_heads=None, use_linear_projection=False, resnet_time_scale_shift="default",
    time_embedding_dim=None)
# Fields that change nothing at float32 inference.
_IGNORED = {"sample_size", "upcast_attention", "dropout", "addition_embed_type_num_heads"}
# Fields our U-Net implements only at these values (diffusers' defaults); anything else is refused by name.
_FIXED: dict[str, tuple] = dict(
    center_input_sample=(False,), only_cross_attention=(False,), dual_cross_attention=(False,),
    class_embed_type=(None,), addition_embed_type=(None,), num_class_embeds=(None,), act_fn=("silu", "swish"),
    downsample_padding=(1,), mid_block_scale_factor=(1,), encoder_hid_dim=(None,), encoder_hid_dim_type=(None,),
    addition_time_embed_dim=(None,), resnet_skip_time_act=(False,), resnet_out_scale_factor=(1,),
    time_embedding_type=("positional",), time_embedding_act_fn=(None,), timestep_post_act=(None,),
    time_cond_proj_dim=(None,), conv_in_kernel=(3,), conv_out_kernel=(3,),
    projection_class_embeddings_input_dim=(None,), attention_type=("default",), class_embeddings_concat=(False,),
    mid_block_only_cross_attention=(None, False), cross_attention_norm=(None,),
    reverse_transformer_layers_per_block=(None,))


def _unsupported(field: str, value: Any, why: str = "") -> WeightsError:
  return WeightsError(f"UNet2DConditionModel config: unsupported {field}={value!r}" + (f" ({why})" if why else ""))


def _per_level(field: str, value: Any, levels: int):
  """An int, or one int per level (as a tuple, or one int if all agree); SDXL's nested lists are refused."""
  if isinstance(value, (list, tuple)):
    if len(value) != levels or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
      raise _unsupported(field, value, f"expected an int or {levels} ints")
    return value[0] if len(set(value)) == 1 else tuple(value)
  if not isinstance(value, int) or isinstance(value, bool):
    raise _unsupported(field, value, "expected an int")
  return value


def config_from_diffusers(config: Mapping[str, Any], **overrides) -> UNetConfig:
  """`UNetConfig` for a diffusers UNet2DConditionModel `config.json` dict; `overrides` (dtype, ...) win."""
  for field, value in config.items():
    if field.startswith("_") or field in _DEFAULTS or field in _IGNORED:
      continue
    if field in _FIXED:
      if field == "only_cross_attention" and isinstance(value, list):
        value = any(value)  # per-block form
      if value not in _FIXED[field]:
        raise _unsupported(field, config[field])
    elif value not in (None, False):
      # A field newer than this loader: refuse rather than guess what it changes.
      raise _unsupported(field, value, "unknown field")
  c = {**_DEFAULTS, **{k: v for k, v in config.items() if k in _DEFAULTS}}
  chans = tuple(c["block_out_channels"])
  levels = len(chans)
  down, up = tuple(c["down_block_types"]), tuple(c["up_block_types"])
  for field, types, ok in (("down_block_types", down, (_CROSS_DOWN, _PLAIN_DOWN)),
                           ("up_block_types", up, (_CROSS_UP, _PLAIN_UP))):
    if len(types) != levels:
      raise _unsupported(field, list(types), f"expected {levels} blocks, one per block_out_channels entry")
    for t in types:
      if t not in ok:
        raise _unsupported(field, t, f"supported: {', '.join(ok)}")
  if c["mid_block_type"] not in (_MID, None):
    raise _unsupported("mid_block_type", c["mid_block_type"], f"supported: {_MID}, None")
  if c["norm_num_groups"] is None:
    raise _unsupported("norm_num_groups", None)
  if c["resnet_time_scale_shift"] not in ("default", "scale_shift"):
    raise _unsupported("resnet_time_scale_shift", c["resnet_time_scale_shift"])
  cross = c["cross_attention_dim"]
  if isinstance(cross, (list, tuple)):
    if len(set(cross)) != 1:
      raise _unsupported("cross_attention_dim", cross, "one width for all blocks")
    cross = cross[0]
  # diffusers' legacy naming: `attention_head_dim` holds the number of heads unless num_attention_heads is set.
  heads_field = "num_attention_heads" if c["num_attention_heads"] is not None else "attention_head_dim"
  attention_levels = tuple(t == _CROSS_DOWN for t in down)
  up_levels = tuple(t == _CROSS_UP for t in reversed(up))  # up_block_types run from the lowest resolution
  cfg = UNetConfig(
      in_channels=c["in_channels"], out_channels=c["out_channels"], block_out_channels=chans,
      layers_per_block=_per_level("layers_per_block", c["layers_per_block"], levels),
      attention_levels=attention_levels, up_attention_levels=None if up_levels == attention_levels else up_levels,
      use_mid_block=c["mid_block_type"] is not None, mid_block_attention=True,
      num_attention_heads=_per_level(heads_field, c[heads_field], levels), cross_attention_dim=cross,
      transformer_layers_per_block=_per_level("transformer_layers_per_block", c["transformer_layers_per_block"],
                                              levels),
      use_linear_projection=bool(c["use_linear_projection"]), norm_num_groups=c["norm_num_groups"],
      norm_eps=float(c["norm_eps"]), flip_sin_to_cos=bool(c["flip_sin_to_cos"]), freq_shift=float(c["freq_shift"]),
      time_embedding_dim=c["time_embedding_dim"], resnet_time_scale_shift=c["resnet_time_scale_shift"])
  return dataclasses.replace(cfg, **overrides)


def diffusers_config(cfg: UNetConfig) -> dict:
  """The diffusers `config.json` dict for `cfg` (the inverse of `config_from_diffusers`)."""
  problems = [name for name, bad in (
      ("num_class_embeds", cfg.num_class_embeds), ("pooled_dim", cfg.pooled_dim),
      ("mid_block_attention=False", cfg.use_mid_block and not cfg.mid_block_attention),
      ("cross_attention_dim=None", cfg.cross_attention_dim is None)) if bad]
  if problems:
    raise WeightsError(f"U-Net with {', '.join(problems)} has no diffusers UNet2DConditionModel equivalent")
  levels = cfg.levels

  def listed(value):
    return list(value) if isinstance(value, (tuple, list)) else value

  try:
    from importlib.metadata import version
    diffusers_version = version("diffusers")
  except Exception:  # noqa: BLE001  (diffusers need not be installed to write its format)
    diffusers_version = "0.42.1"  # the version the parity tests ran against
  return dict(
      _class_name="UNet2DConditionModel", _diffusers_version=diffusers_version,
      in_channels=cfg.in_channels, out_channels=cfg.out_channels, center_input_sample=False,
      flip_sin_to_cos=cfg.flip_sin_to_cos,
      freq_shift=int(cfg.freq_shift) if float(cfg.freq_shift).is_integer() else cfg.freq_shift,
      down_block_types=[_CROSS_DOWN if cfg.attention_levels[i] else _PLAIN_DOWN for i in range(levels)],
      mid_block_type=_MID if cfg.use_mid_block else None,
      up_block_types=[_CROSS_UP if cfg.up_attention_at(i) else _PLAIN_UP for i in reversed(range(levels))],
      only_cross_attention=False, block_out_channels=list(cfg.block_out_channels),
      layers_per_block=listed(cfg.layers_per_block), downsample_padding=1, mid_block_scale_factor=1, act_fn="silu",
      norm_num_groups=cfg.norm_num_groups, norm_eps=cfg.norm_eps, cross_attention_dim=cfg.cross_attention_dim,
      transformer_layers_per_block=listed(cfg.transformer_layers_per_block),
      attention_head_dim=listed(cfg.num_attention_heads),  # diffusers' legacy name for the number of heads
      num_attention_heads=None, dual_cross_attention=False, use_linear_projection=cfg.use_linear_projection,
      class_embed_type=None, addition_embed_type=None, num_class_embeds=None, upcast_attention=False,
      resnet_time_scale_shift=cfg.resnet_time_scale_shift, time_embedding_type="positional",
      time_embedding_dim=cfg.time_embedding_dim, conv_in_kernel=3, conv_out_kernel=3)


# (diffusers module suffix, ours): the only names that differ.
_RENAMES = tuple((f".{attn}.{theirs}", f".{attn}.{ours}") for attn in ("attn1", "attn2")
                 for ours, theirs in DIFFUSERS_ATTENTION.items()) + (
    (".ff.net.0.proj", ".ff.geglu.proj"), (".ff.net.2", ".ff.out"))


def _ours(key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  module, _, leaf = key.rpartition(".")
  for theirs, ours in _RENAMES:
    if module.endswith(theirs):
      module = module[:-len(theirs)] + ours
  if leaf == "weight":
    if value.ndim in (2, 4):
      return module + ".kernel", from_torch(value, kernel_layout(value.ndim))
    if value.ndim == 1:
      return module + ".scale", value  # group/layer norm
  if leaf == "bias":
    return module + ".bias", value
  return key, value  # unknown: left under its own name so `assign` reports it


def from_diffusers_state(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """diffusers state dict → our dotted parameter paths and Flax layouts (names are not checked here)."""
  return dict(_ours(k, v) for k, v in state.items())


def to_diffusers_state(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Our parameters (`weights.model_arrays`) → a diffusers state dict (the inverse of `from_diffusers_state`)."""
  out = {}
  for key, value in arrays.items():
    module, _, leaf = key.rpartition(".")
    for theirs, ours in _RENAMES:
      if module.endswith(ours):
        module = module[:-len(ours)] + theirs
    if leaf == "kernel":
      value = to_torch(value, kernel_layout(value.ndim))
      leaf = "weight"
    elif leaf == "scale":
      leaf = "weight"
    elif leaf != "bias":
      raise WeightsError(f"parameter {key} has no diffusers equivalent")
    out[f"{module}.{leaf}"] = np.ascontiguousarray(value)
  return out


def _abstract_model(cfg: UNetConfig) -> UNet2DConditionModel:
  # Shapes only: the checkpoint supplies every value, so random initialisation would be wasted work (SD's
  # U-Net is 860M parameters).
  return abstract_model(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))


@register_loader("UNet2DConditionModel")
def load_unet(folder: str, config: Optional[Mapping[str, Any]] = None, *, allow_pickle: bool = False,
              dtype: Any = None, attention_impl: Optional[str] = None) -> UNet2DConditionModel:
  """Our `UNet2DConditionModel` with the weights of a diffusers `unet/` folder (config.json + weights).

  `dtype` is the compute dtype (parameters stay float32); `attention_impl` picks the attention kernel.
  """
  if config is None:
    config = read_config(folder)
  cfg = config_from_diffusers(config, dtype=dtype, attention_impl=attention_impl)
  model = _abstract_model(cfg)
  assign(model, from_diffusers_state(read_folder(folder, allow_pickle=allow_pickle)), source=folder)
  state = nnx.state(model)
  leftovers = [".".join(map(str, p)) for p, v in state.flat_state() if isinstance(v.value, jax.ShapeDtypeStruct)]
  if leftovers:  # a non-parameter variable no checkpoint fills: a model change this loader has not caught up with
    raise WeightsError(f"{folder}: model state {leftovers[0]} has no value in a diffusers checkpoint")
  # assign leaves numpy arrays in place; hold device arrays like a freshly initialised model does.
  nnx.update(model, jax.tree.map(jnp.asarray, state))
  return model


def save_diffusers_unet(model: UNet2DConditionModel, folder: str) -> None:
  """Writes `model` as a diffusers `UNet2DConditionModel` folder (config.json + safetensors)."""
  config = diffusers_config(model.config)
  os.makedirs(folder, exist_ok=True)
  save_safetensors(to_diffusers_state(model_arrays(model)),
                   os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
