"""diffusers U-Net folders ↔ our NNX U-Net: `UNet2DConditionModel` (Stable Diffusion 1.x/2.x `unet/`, unCLIP/Karlo
`decoder/`) and `UNet2DModel` (Karlo's `super_res_first/` and `super_res_last/`, DDPM).

  unet = pretrained.load("stable-diffusion-v1-5/unet")     # or load_unet(folder, read_config(folder))
  eps = unet(latents_nhwc, t, text_states)
  decoder = pretrained.load("karlo-v1-alpha/decoder")
  out = decoder(x_nhwc, t, text_states, class_labels=additive_embedding, encoder_attention_mask=text_mask)
  super_res = pretrained.load("karlo-v1-alpha/super_res_first")    # our UNet2DModel
  out = super_res(concat([noisy, upsampled_low_res], -1), t)

Our module tree mirrors diffusers', so a weight's name is its diffusers name with a few renames (our attention's
query/key/value/out, and diffusers keeps a dropout inside `to_out` and `ff.net`) and PyTorch's layouts turned into
Flax's: conv OIHW → HWIO, linear (out, in) → (in, out), norm `weight` → `scale`. Every config field either maps onto
`UNetConfig`, is irrelevant at float32 inference (`upcast_attention`, `dropout`, `sample_size`), or must hold the
one value we implement; anything else is a one-line `WeightsError` naming the field, so an SDXL-style or
Kandinsky-style U-Net never loads half right.
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

from diffusion_jax.models.unet import UNet2DConditionModel, UNet2DModel, UNetConfig
from diffusion_jax.models.tracing import abstract_model
from diffusion_jax.pretrained import register_loader
from diffusion_jax.pretrained.weights import (DIFFUSERS_ATTENTION, WeightsError, assign, from_torch, kernel_layout,
                                              model_arrays, read_config, read_folder, save_safetensors, to_torch)

__all__ = ["config_from_diffusers", "diffusers_config", "unet2d_config_from_diffusers", "unet2d_diffusers_config",
           "from_diffusers_state", "to_diffusers_state", "load_unet", "load_unet2d", "save_diffusers_unet"]

_COND, _PLAIN = "UNet2DConditionModel", "UNet2DModel"
_MID = "UNetMidBlock2DCrossAttn"

# diffusers block type → (has attention, our attention_block, our resample): UNet2DConditionModel's, then
# UNet2DModel's, whose attention blocks resample as its downsample_type / upsample_type say (None here).
_DOWN_BLOCKS = {"CrossAttnDownBlock2D": (True, "transformer", "conv"), "DownBlock2D": (False, None, "conv"),
                "SimpleCrossAttnDownBlock2D": (True, "added_kv", "resnet"),
                "ResnetDownsampleBlock2D": (False, None, "resnet")}
_UP_BLOCKS = {"CrossAttnUpBlock2D": (True, "transformer", "conv"), "UpBlock2D": (False, None, "conv"),
              "SimpleCrossAttnUpBlock2D": (True, "added_kv", "resnet"),
              "ResnetUpsampleBlock2D": (False, None, "resnet")}
_MID_BLOCKS = {_MID: "transformer", "UNetMidBlock2DSimpleCrossAttn": "added_kv"}
_DOWN_BLOCKS_2D = {"DownBlock2D": (False, None, "conv"), "ResnetDownsampleBlock2D": (False, None, "resnet"),
                   "AttnDownBlock2D": (True, "spatial", None)}
_UP_BLOCKS_2D = {"UpBlock2D": (False, None, "conv"), "ResnetUpsampleBlock2D": (False, None, "resnet"),
                 "AttnUpBlock2D": (True, "spatial", None)}

# diffusers' constructor defaults for the fields we map: old hub configs (SD 1.x) omit the newer ones.
_DEFAULTS = dict(
    in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), mid_block_type=_MID,
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2, norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1280, transformer_layers_per_block=1,
    attention_head_dim=8, num_attention_heads=None, use_linear_projection=False, resnet_time_scale_shift="default",
    time_embedding_dim=None, only_cross_attention=False, mid_block_only_cross_attention=None, class_embed_type=None)
# Fields that change nothing at float32 inference.
_IGNORED = {"sample_size", "upcast_attention", "dropout", "addition_embed_type_num_heads"}
# Fields our U-Net implements only at these values (diffusers' defaults); anything else is refused by name.
_FIXED: dict[str, tuple] = dict(
    center_input_sample=(False,), dual_cross_attention=(False,), addition_embed_type=(None,), num_class_embeds=(None,),
    act_fn=("silu", "swish"), downsample_padding=(1,), mid_block_scale_factor=(1,), encoder_hid_dim=(None,),
    encoder_hid_dim_type=(None,), addition_time_embed_dim=(None,), resnet_skip_time_act=(False,),
    resnet_out_scale_factor=(1,), time_embedding_type=("positional",), time_embedding_act_fn=(None,),
    timestep_post_act=(None,), time_cond_proj_dim=(None,), conv_in_kernel=(3,), conv_out_kernel=(3,),
    projection_class_embeddings_input_dim=(None,), attention_type=("default",), class_embeddings_concat=(False,),
    cross_attention_norm=(None,), reverse_transformer_layers_per_block=(None,))
# The same for UNet2DModel.
_DEFAULTS_2D = dict(
    in_channels=3, out_channels=3, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * 3, mid_block_type="UNetMidBlock2D",
    up_block_types=("AttnUpBlock2D",) * 3 + ("UpBlock2D",), block_out_channels=(224, 448, 672, 896),
    layers_per_block=2, downsample_type="conv", upsample_type="conv", attention_head_dim=8, norm_num_groups=32,
    attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default", add_attention=True,
    time_embedding_dim=None, class_embed_type=None)
_IGNORED_2D = {"sample_size", "dropout", "num_train_timesteps"}
_FIXED_2D: dict[str, tuple] = dict(
    center_input_sample=(False,), time_embedding_type=("positional",), mid_block_scale_factor=(1,),
    downsample_padding=(1,), act_fn=("silu", "swish"), num_class_embeds=(None,))


def _unsupported(field: str, value: Any, why: str = "", cls: str = _COND) -> WeightsError:
  return WeightsError(f"{cls} config: unsupported {field}={value!r}" + (f" ({why})" if why else ""))


def _mapped_fields(config: Mapping[str, Any], cls: str, defaults: dict, ignored: set, fixed: dict) -> dict:
  """`defaults` updated from `config`, after refusing any field this loader does not implement as given."""
  for field, value in config.items():
    if field.startswith("_") or field in defaults or field in ignored:
      continue
    if field in fixed:
      if value not in fixed[field]:
        raise _unsupported(field, value, cls=cls)
    elif value not in (None, False):
      # A field newer than this loader: refuse rather than guess what it changes.
      raise _unsupported(field, value, "unknown field", cls)
  return {**defaults, **{k: v for k, v in config.items() if k in defaults}}


def _per_level(field: str, value: Any, levels: int, cls: str = _COND):
  """An int, or one int per level (as a tuple, or one int if all agree); SDXL's nested lists are refused."""
  if isinstance(value, (list, tuple)):
    if len(value) != levels or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
      raise _unsupported(field, value, f"expected an int or {levels} ints", cls)
    return value[0] if len(set(value)) == 1 else tuple(value)
  if not isinstance(value, int) or isinstance(value, bool):
    raise _unsupported(field, value, "expected an int", cls)
  return value


def _layout(c: Mapping[str, Any], cls: str, down_table: dict, up_table: dict, mid_attention: Optional[str],
            attention_resample: tuple = (None, None)):
  """(down attention levels, up attention levels, attention_block or None, resample) of the block type lists.

  One attention kind and one resampling style serve the whole U-Net (true of every published diffusers U-Net),
  so a config mixing them is refused, naming the field where the mix shows.
  """
  levels = len(c["block_out_channels"])
  kinds, resamples, attends = set(), set(), []
  for field, table, sampler in (("down_block_types", down_table, attention_resample[0]),
                                ("up_block_types", up_table, attention_resample[1])):
    types = list(c[field])
    if len(types) != levels:
      raise _unsupported(field, types, f"expected {levels} blocks, one per block_out_channels entry", cls)
    for t in types:
      if t not in table:
        raise _unsupported(field, t, f"supported: {', '.join(table)}", cls)
    attends.append(tuple(table[t][0] for t in types))
    kinds |= {table[t][1] for t in types} - {None}
    resamples |= {table[t][2] or sampler for t in types[:-1]}  # the last block of each path does not resample
    if len(kinds) > 1 or len(resamples) > 1:
      raise _unsupported(field, types, "mixes attention kinds or resampling styles", cls)
  if mid_attention is not None and kinds - {mid_attention}:
    raise _unsupported("mid_block_type", c["mid_block_type"], f"the blocks' attention is {kinds.pop()}", cls)
  kinds.add(mid_attention)
  down, up = attends
  # up_block_types run from the lowest resolution.
  return down, up[::-1], next(iter(kinds - {None}), None), next(iter(resamples), "conv")


def _heads_from_widths(c: Mapping[str, Any], chans: tuple, cls: str):
  """Heads per level when `attention_head_dim` is what it says, the width of a head (SimpleCrossAttn and
  UNet2DModel blocks; None: one head as wide as the channels)."""
  widths = c["attention_head_dim"]
  widths = list(widths) if isinstance(widths, (list, tuple)) else [widths] * len(chans)
  if len(widths) != len(chans):
    raise _unsupported("attention_head_dim", c["attention_head_dim"], f"expected {len(chans)} entries", cls)
  # diffusers reverses head counts for the up path but not these widths: its up block at level l gets the width
  # given for level levels-1-l. We keep one head count per level, so the two readings must agree.
  down, up = ([ch if w is None else w for ch, w in zip(chans, ws)] for ws in (widths, widths[::-1]))
  if any(not isinstance(w, int) or ch % w for ch, w in zip(chans + chans, down + up)):
    raise _unsupported("attention_head_dim", c["attention_head_dim"], f"must divide block_out_channels {chans}", cls)
  if down != up:
    raise _unsupported("attention_head_dim", c["attention_head_dim"],
                       "per-level widths that diffusers' up path reads in reverse", cls)
  return _per_level("attention_head_dim", [ch // w for ch, w in zip(chans, down)], len(chans), cls)


def _only_cross_attention(c: Mapping[str, Any], down: tuple, up: tuple, mid_attends: bool,
                          kind: Optional[str]) -> bool:
  """diffusers' per-block `only_cross_attention` as one flag; it must agree wherever there is attention."""
  value, levels = c["only_cross_attention"], len(down)
  per_level = list(value) if isinstance(value, (list, tuple)) else [value] * levels
  if len(per_level) != levels:
    raise _unsupported("only_cross_attention", value, f"expected {levels} entries")
  mid = c["mid_block_only_cross_attention"]
  if mid is None:  # diffusers' rule: a single flag carries over to the middle block, a list does not
    mid = value if isinstance(value, bool) else False
  allowed = {False, True} if kind == "added_kv" else {False}
  used = {bool(v) for v, d, u in zip(per_level, down, up) if d or u}
  if len(used) > 1 or not used <= allowed:
    raise _unsupported("only_cross_attention", value, "only with SimpleCrossAttn blocks, and the same everywhere")
  if mid_attends:
    if bool(mid) not in allowed or (used and bool(mid) not in used):
      raise _unsupported("mid_block_only_cross_attention", c["mid_block_only_cross_attention"],
                         "only with SimpleCrossAttn blocks, and as the other blocks")
    used.add(bool(mid))
  return True in used


def config_from_diffusers(config: Mapping[str, Any], **overrides) -> UNetConfig:
  """`UNetConfig` for a diffusers UNet2DConditionModel `config.json` dict; `overrides` (dtype, ...) win."""
  c = _mapped_fields(config, _COND, _DEFAULTS, _IGNORED, _FIXED)
  chans = tuple(c["block_out_channels"])
  levels = len(chans)
  mid_type = c["mid_block_type"]
  if mid_type not in (*_MID_BLOCKS, None):
    raise _unsupported("mid_block_type", mid_type, f"supported: {', '.join(_MID_BLOCKS)}, None")
  down, up, kind, resample = _layout(c, _COND, _DOWN_BLOCKS, _UP_BLOCKS, _MID_BLOCKS.get(mid_type))
  if c["norm_num_groups"] is None:
    raise _unsupported("norm_num_groups", None)
  if c["resnet_time_scale_shift"] not in ("default", "scale_shift"):
    raise _unsupported("resnet_time_scale_shift", c["resnet_time_scale_shift"])
  if c["class_embed_type"] not in (None, "identity"):
    raise _unsupported("class_embed_type", c["class_embed_type"], "supported: None, 'identity'")
  cross = c["cross_attention_dim"]
  if isinstance(cross, (list, tuple)):
    if len(set(cross)) != 1:
      raise _unsupported("cross_attention_dim", cross, "one width for all blocks")
    cross = cross[0]
  if kind == "added_kv":
    heads = _heads_from_widths(c, chans, _COND)
  else:
    # diffusers' legacy naming: `attention_head_dim` holds the number of heads unless num_attention_heads is set.
    heads_field = "num_attention_heads" if c["num_attention_heads"] is not None else "attention_head_dim"
    heads = _per_level(heads_field, c[heads_field], levels)
  cfg = UNetConfig(
      in_channels=c["in_channels"], out_channels=c["out_channels"], block_out_channels=chans,
      layers_per_block=_per_level("layers_per_block", c["layers_per_block"], levels),
      attention_levels=down, up_attention_levels=None if up == down else up,
      attention_block=kind or "transformer",
      only_cross_attention=_only_cross_attention(c, down, up, mid_type is not None, kind), resample=resample,
      use_mid_block=mid_type is not None, mid_block_attention=True, num_attention_heads=heads,
      cross_attention_dim=cross,
      transformer_layers_per_block=_per_level("transformer_layers_per_block", c["transformer_layers_per_block"],
                                              levels),
      use_linear_projection=bool(c["use_linear_projection"]), norm_num_groups=c["norm_num_groups"],
      norm_eps=float(c["norm_eps"]), flip_sin_to_cos=bool(c["flip_sin_to_cos"]), freq_shift=float(c["freq_shift"]),
      time_embedding_dim=c["time_embedding_dim"], class_embed=c["class_embed_type"],
      resnet_time_scale_shift=c["resnet_time_scale_shift"])
  return dataclasses.replace(cfg, **overrides)


def unet2d_config_from_diffusers(config: Mapping[str, Any], **overrides) -> UNetConfig:
  """`UNetConfig` for a diffusers UNet2DModel `config.json` dict (no text); `overrides` (dtype, ...) win."""
  c = _mapped_fields(config, _PLAIN, _DEFAULTS_2D, _IGNORED_2D, _FIXED_2D)
  chans = tuple(c["block_out_channels"])
  for field in ("downsample_type", "upsample_type"):
    if c[field] not in ("conv", "resnet"):
      raise _unsupported(field, c[field], "supported: 'conv', 'resnet'", _PLAIN)
  if c["mid_block_type"] not in ("UNetMidBlock2D", None):
    raise _unsupported("mid_block_type", c["mid_block_type"], "supported: UNetMidBlock2D, None", _PLAIN)
  mid_attends = c["mid_block_type"] is not None and bool(c["add_attention"])
  down, up, _, resample = _layout(c, _PLAIN, _DOWN_BLOCKS_2D, _UP_BLOCKS_2D, "spatial" if mid_attends else None,
                                  (c["downsample_type"], c["upsample_type"]))
  shift = c["resnet_time_scale_shift"]
  if shift not in ("default", "scale_shift"):
    raise _unsupported("resnet_time_scale_shift", shift, cls=_PLAIN)
  if c["class_embed_type"] not in (None, "identity"):
    raise _unsupported("class_embed_type", c["class_embed_type"], "supported: None, 'identity'", _PLAIN)
  # diffusers gives the middle attention a group norm of norm_num_groups groups unless it is told otherwise, or
  # the resnets use scale_shift.
  attn_groups = c["attn_norm_num_groups"]
  if attn_groups not in (None, c["norm_num_groups"]):
    raise _unsupported("attn_norm_num_groups", attn_groups, "None or norm_num_groups", _PLAIN)
  cfg = UNetConfig(
      in_channels=c["in_channels"], out_channels=c["out_channels"], block_out_channels=chans,
      layers_per_block=_per_level("layers_per_block", c["layers_per_block"], len(chans), _PLAIN),
      attention_levels=down, up_attention_levels=None if up == down else up, attention_block="spatial",
      resample=resample, use_mid_block=c["mid_block_type"] is not None, mid_block_attention=bool(c["add_attention"]),
      mid_attention_group_norm=attn_groups is not None or shift == "default",
      num_attention_heads=_heads_from_widths(c, chans, _PLAIN), cross_attention_dim=None,
      norm_num_groups=c["norm_num_groups"], norm_eps=float(c["norm_eps"]), flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
      freq_shift=float(c["freq_shift"]), time_embedding_dim=c["time_embedding_dim"],
      class_embed=c["class_embed_type"], resnet_time_scale_shift=shift)
  return dataclasses.replace(cfg, **overrides)


def _block_type(table: dict, attends: bool, kind: str, resample: str) -> Optional[str]:
  """The diffusers block of `table` for one level (None: there is none)."""
  for name, (a, k, r) in table.items():
    if a == attends and (k == kind or not a) and r in (resample, None):
      return name
  return None


def _listed(value):
  return list(value) if isinstance(value, (tuple, list)) else value


def _diffusers_version() -> str:
  try:
    from importlib.metadata import version
    return version("diffusers")
  except Exception:  # noqa: BLE001  (diffusers need not be installed to write its format)
    return "0.42.1"  # the version the parity tests ran against


def _block_types(cfg: UNetConfig, down_table: dict, up_table: dict, cls: str) -> tuple[list, list]:
  levels = cfg.levels
  down = [_block_type(down_table, bool(cfg.attention_levels[i]), cfg.attention_block, cfg.resample)
          for i in range(levels)]
  up = [_block_type(up_table, cfg.up_attention_at(i), cfg.attention_block, cfg.resample)
        for i in reversed(range(levels))]
  if None in down + up:
    raise WeightsError(f"U-Net with attention_block={cfg.attention_block!r} and resample={cfg.resample!r} has no "
                       f"diffusers {cls} equivalent")
  return down, up


def _head_width_field(cfg: UNetConfig, cls: str):
  """`attention_head_dim` as the width of a head (the inverse of `_heads_from_widths`)."""
  chans, heads = cfg.block_out_channels, [cfg.heads_at(i) for i in range(cfg.levels)]
  widths = [ch // n for ch, n in zip(chans, heads)]
  divides = not any(ch % n for ch, n in zip(chans, heads))
  if divides and len(set(widths)) == 1:
    return widths[0]
  if set(heads) == {1}:
    return None  # diffusers' spelling of one head as wide as the channels
  if divides and cls == _COND and widths == widths[::-1]:
    return widths  # per level, which diffusers' up path reads in reverse
  raise WeightsError(f"U-Net with num_attention_heads={cfg.num_attention_heads!r} for block_out_channels "
                     f"{tuple(chans)} has no diffusers {cls} equivalent")


def diffusers_config(cfg: UNetConfig) -> dict:
  """The diffusers `config.json` dict for `cfg` (the inverse of `config_from_diffusers`)."""
  problems = [name for name, bad in (
      ("num_class_embeds", cfg.num_class_embeds), ("pooled_dim", cfg.pooled_dim),
      ("mid_block_attention=False", cfg.use_mid_block and not cfg.mid_block_attention),
      ("cross_attention_dim=None", cfg.cross_attention_dim is None)) if bad]
  if problems:
    raise WeightsError(f"U-Net with {', '.join(problems)} has no diffusers UNet2DConditionModel equivalent")
  down, up = _block_types(cfg, _DOWN_BLOCKS, _UP_BLOCKS, _COND)
  added_kv = cfg.attention_block == "added_kv"
  mid = next(name for name, kind in _MID_BLOCKS.items() if kind == cfg.attention_block)
  return dict(
      _class_name=_COND, _diffusers_version=_diffusers_version(),
      in_channels=cfg.in_channels, out_channels=cfg.out_channels, center_input_sample=False,
      flip_sin_to_cos=cfg.flip_sin_to_cos,
      freq_shift=int(cfg.freq_shift) if float(cfg.freq_shift).is_integer() else cfg.freq_shift,
      down_block_types=down, mid_block_type=mid if cfg.use_mid_block else None, up_block_types=up,
      only_cross_attention=cfg.only_cross_attention, mid_block_only_cross_attention=cfg.only_cross_attention,
      block_out_channels=list(cfg.block_out_channels),
      layers_per_block=_listed(cfg.layers_per_block), downsample_padding=1, mid_block_scale_factor=1, act_fn="silu",
      norm_num_groups=cfg.norm_num_groups, norm_eps=cfg.norm_eps, cross_attention_dim=cfg.cross_attention_dim,
      transformer_layers_per_block=_listed(cfg.transformer_layers_per_block),
      # The width of a head for SimpleCrossAttn blocks; diffusers' legacy name for the number of heads otherwise.
      attention_head_dim=_head_width_field(cfg, _COND) if added_kv else _listed(cfg.num_attention_heads),
      num_attention_heads=None, dual_cross_attention=False, use_linear_projection=cfg.use_linear_projection,
      class_embed_type=cfg.class_embed, addition_embed_type=None, num_class_embeds=None, upcast_attention=False,
      resnet_time_scale_shift=cfg.resnet_time_scale_shift, time_embedding_type="positional",
      time_embedding_dim=cfg.time_embedding_dim, conv_in_kernel=3, conv_out_kernel=3)


def unet2d_diffusers_config(cfg: UNetConfig) -> dict:
  """The diffusers UNet2DModel `config.json` dict for `cfg` (the inverse of `unet2d_config_from_diffusers`)."""
  scale_shift = cfg.resnet_time_scale_shift == "scale_shift"
  mid_norm = cfg.mid_attention_group_norm
  problems = [name for name, bad in (
      ("num_class_embeds", cfg.num_class_embeds), ("pooled_dim", cfg.pooled_dim),
      ("per-level layers_per_block", isinstance(cfg.layers_per_block, (tuple, list))),
      ("a middle attention without group norm and default time shift",
       cfg.use_mid_block and cfg.mid_block_attention and not mid_norm and not scale_shift)) if bad]
  if problems:
    raise WeightsError(f"U-Net with {', '.join(problems)} has no diffusers UNet2DModel equivalent")
  down, up = _block_types(cfg, _DOWN_BLOCKS_2D, _UP_BLOCKS_2D, _PLAIN)
  return dict(
      _class_name=_PLAIN, _diffusers_version=_diffusers_version(),
      in_channels=cfg.in_channels, out_channels=cfg.out_channels, center_input_sample=False,
      time_embedding_type="positional", time_embedding_dim=cfg.time_embedding_dim,
      freq_shift=int(cfg.freq_shift) if float(cfg.freq_shift).is_integer() else cfg.freq_shift,
      flip_sin_to_cos=cfg.flip_sin_to_cos, down_block_types=down,
      mid_block_type="UNetMidBlock2D" if cfg.use_mid_block else None, up_block_types=up,
      block_out_channels=list(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
      mid_block_scale_factor=1, downsample_padding=1, downsample_type=cfg.resample, upsample_type=cfg.resample,
      act_fn="silu", attention_head_dim=_head_width_field(cfg, _PLAIN), norm_num_groups=cfg.norm_num_groups,
      attn_norm_num_groups=cfg.norm_num_groups if scale_shift and mid_norm else None, norm_eps=cfg.norm_eps,
      resnet_time_scale_shift=cfg.resnet_time_scale_shift, add_attention=cfg.mid_block_attention,
      class_embed_type=cfg.class_embed, num_class_embeds=None)


# (diffusers module suffix, ours): the only names that differ. The feed-forward's come first: our `ff.out` must
# not be taken for an attention's `out`.
_RENAMES = ((".ff.net.0.proj", ".ff.geglu.proj"), (".ff.net.2", ".ff.out")) + tuple(
    (f".{theirs}", f".{ours}") for ours, theirs in DIFFUSERS_ATTENTION.items())
# Attention names of checkpoints saved before diffusers renamed them (old UNet2DModel folders such as DDPM's);
# diffusers converts them on load, and so do we. Their query/key/value already have our names.
_OLD_RENAMES = ((".proj_attn", ".out"),)


def _ours(key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  module, _, leaf = key.rpartition(".")
  for theirs, ours in _RENAMES + _OLD_RENAMES:
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


def diffusers_module(module: str) -> str:
  """Our dotted module name → diffusers' (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.out` →
  `....attn1.to_out.0`)."""
  for theirs, ours in _RENAMES:
    if module.endswith(ours):
      module = module[:-len(ours)] + theirs
  return module


def diffusers_key(path: str) -> tuple[str, str]:
  """Our dotted parameter path → (diffusers key, layout), for `pretrained.lora`'s adapters on linear layers."""
  module, _, leaf = path.rpartition(".")
  if leaf == "kernel":
    return f"{diffusers_module(module)}.weight", "linear"
  return f"{diffusers_module(module)}.{'weight' if leaf == 'scale' else leaf}", "same"


def to_diffusers_state(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Our parameters (`weights.model_arrays`) → a diffusers state dict (the inverse of `from_diffusers_state`)."""
  out = {}
  for key, value in arrays.items():
    module, _, leaf = key.rpartition(".")
    module = diffusers_module(module)
    if leaf == "kernel":
      value = to_torch(value, kernel_layout(value.ndim))
      leaf = "weight"
    elif leaf == "scale":
      leaf = "weight"
    elif leaf != "bias":
      raise WeightsError(f"parameter {key} has no diffusers equivalent")
    out[f"{module}.{leaf}"] = np.ascontiguousarray(value)
  return out


def _load(folder: str, cls: type, cfg: UNetConfig, allow_pickle: bool) -> UNet2DConditionModel:
  # Shapes only: the checkpoint supplies every value, so random initialisation would be wasted work (SD's
  # U-Net is 860M parameters).
  model = abstract_model(lambda: cls(cfg, rngs=nnx.Rngs(0)))
  assign(model, from_diffusers_state(read_folder(folder, allow_pickle=allow_pickle)), source=folder)
  state = nnx.state(model)
  leftovers = [".".join(map(str, p)) for p, v in state.flat_state() if isinstance(v.value, jax.ShapeDtypeStruct)]
  if leftovers:  # a non-parameter variable no checkpoint fills: a model change this loader has not caught up with
    raise WeightsError(f"{folder}: model state {leftovers[0]} has no value in a diffusers checkpoint")
  # assign leaves numpy arrays in place; hold device arrays like a freshly initialised model does.
  nnx.update(model, jax.tree.map(jnp.asarray, state))
  return model


@register_loader(_COND)
def load_unet(folder: str, config: Optional[Mapping[str, Any]] = None, *, allow_pickle: bool = False,
              dtype: Any = None, attention_impl: Optional[str] = None) -> UNet2DConditionModel:
  """Our `UNet2DConditionModel` with the weights of a diffusers `unet/` (or Karlo `decoder/`) folder.

  `dtype` is the compute dtype (parameters stay float32); `attention_impl` picks the attention kernel.
  """
  cfg = config_from_diffusers(read_config(folder) if config is None else config, dtype=dtype,
                              attention_impl=attention_impl)
  return _load(folder, UNet2DConditionModel, cfg, allow_pickle)


@register_loader(_PLAIN)
def load_unet2d(folder: str, config: Optional[Mapping[str, Any]] = None, *, allow_pickle: bool = False,
                dtype: Any = None, attention_impl: Optional[str] = None) -> UNet2DModel:
  """Our `UNet2DModel` with the weights of a diffusers UNet2DModel folder (e.g. Karlo's `super_res_first/`)."""
  cfg = unet2d_config_from_diffusers(read_config(folder) if config is None else config, dtype=dtype,
                                     attention_impl=attention_impl)
  return _load(folder, UNet2DModel, cfg, allow_pickle)


def save_diffusers_unet(model: UNet2DConditionModel, folder: str) -> None:
  """Writes `model` as a diffusers folder (config.json + safetensors): a `UNet2DModel` one for our `UNet2DModel`,
  a `UNet2DConditionModel` one otherwise."""
  plain = isinstance(model, UNet2DModel)
  config = unet2d_diffusers_config(model.config) if plain else diffusers_config(model.config)
  os.makedirs(folder, exist_ok=True)
  save_safetensors(to_diffusers_state(model_arrays(model)),
                   os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
