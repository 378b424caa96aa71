"""diffusers `AutoencoderKL` folders (a pipeline's `vae/`) and `VQModel` folders (latent diffusion's VQ first
stages) ↔ our NNX `AutoencoderKL` and `VQModel`.

  vae = pretrained.load("stable-diffusion-v1-5/vae")     # dispatches here on `_class_name`
  vq = pretrained.load("ldm-celebahq-256/vqvae")          # a VQModel: vq.encode / vq.quantize / vq.decode
  save_diffusers_vae(vae, "out/vae")                      # and back (either class), loadable by diffusers

Our submodule paths mirror diffusers' keys, so the mapping is a rename of the leaf (kernel/scale → weight) and of
the attention projections (query → to_q, ..., out → to_out.0) plus layout: conv kernels OIHW → HWIO, linear
weights transposed, the VQ codebook (`quantize.embedding.weight`, an embedding table) as it is.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.models.tracing import abstract_model
from diffusion_jax.models.vae import AutoencoderKL, VAEConfig
from diffusion_jax.models.vq import VQConfig, VQModel
from diffusion_jax.pretrained import register_loader
from diffusion_jax.pretrained.weights import (DIFFUSERS_ATTENTION, WeightsError, assign, from_torch, kernel_layout,
                                              model_arrays, read_folder, save_safetensors, to_torch)

# Checkpoints written before diffusers renamed its attention blocks (e.g. the original SD 1.x `vae/`) use these
# names; diffusers converts them on load, and so do we.
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LOAD_OPTIONS = ("dtype", "attention_impl")


def _common_fields(config: dict, source: str, options: dict) -> dict:
  """The encoder/decoder fields both classes share (missing ones take diffusers' defaults), checked."""
  chans = tuple(config.get("block_out_channels", (64,)))
  for field, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
    types = list(config.get(field, [block]))
    if any(t != block for t in types):
      raise WeightsError(f"{source}: {field} {types} is not supported; only {block} is")
    if len(types) != len(chans):
      raise WeightsError(f"{source}: {field} has {len(types)} entries for {len(chans)} block_out_channels")
  if config.get("act_fn", "silu") != "silu":
    raise WeightsError(f"{source}: act_fn {config['act_fn']!r} is not supported; only 'silu' is")
  unknown = sorted(set(options) - set(_LOAD_OPTIONS))
  if unknown:
    raise TypeError(f"unknown AutoencoderKL load options {unknown}; known: {list(_LOAD_OPTIONS)}")
  # force_upcast, sample_size (tiling) and latents_mean/std (pipeline-side normalisation) do not change the network.
  return dict(in_channels=config.get("in_channels", 3), out_channels=config.get("out_channels", 3),
              block_out_channels=chans, layers_per_block=config.get("layers_per_block", 1),
              norm_num_groups=config.get("norm_num_groups", 32),
              mid_block_attention=config.get("mid_block_add_attention", True),
              scaling_factor=config.get("scaling_factor", 0.18215), **options)


def config_from_diffusers(config: dict, source: str = "config.json", **options: Any) -> VAEConfig:
  """The `VAEConfig` for a diffusers AutoencoderKL `config.json` dict (missing fields take diffusers' defaults)."""
  return VAEConfig(**_common_fields(config, source, options), latent_channels=config.get("latent_channels", 4),
                   shift_factor=config.get("shift_factor"), use_quant_conv=config.get("use_quant_conv", True),
                   use_post_quant_conv=config.get("use_post_quant_conv", True))


def vq_config_from_diffusers(config: dict, source: str = "config.json", **options: Any) -> VQConfig:
  """The `VQConfig` for a diffusers VQModel `config.json` dict; `lookup_from_codebook` is what `decode_indices`
  does, `force_upcast` does not change the network."""
  norm_type = config.get("norm_type", "group")
  latent = config.get("latent_channels", 3)
  if norm_type not in ("group", "spatial"):
    raise WeightsError(f"{source}: norm_type {norm_type!r} is not supported; 'group' and 'spatial' (MoVQ) are")
  if norm_type == "spatial" and config.get("vq_embed_dim") not in (None, latent):
    raise WeightsError(f"{source}: a spatial-norm decoder takes codes as wide as latent_channels={latent}, but "
                       f"vq_embed_dim={config['vq_embed_dim']}")
  return VQConfig(**_common_fields(config, source, options), latent_channels=latent, norm_type=norm_type,
                  num_vq_embeddings=config.get("num_vq_embeddings", 256), vq_embed_dim=config.get("vq_embed_dim"))


def config_to_diffusers(cfg: VAEConfig) -> dict:
  levels = len(cfg.block_out_channels)
  if isinstance(cfg, VQConfig):
    kind = {"_class_name": "VQModel", "num_vq_embeddings": cfg.num_vq_embeddings, "vq_embed_dim": cfg.code_dim,
            "norm_type": cfg.norm_type}
  else:
    kind = {"_class_name": "AutoencoderKL", "shift_factor": cfg.shift_factor, "use_quant_conv": cfg.use_quant_conv,
            "use_post_quant_conv": cfg.use_post_quant_conv}
  return kind | {
      "in_channels": cfg.in_channels,
      "out_channels": cfg.out_channels,
      "down_block_types": ["DownEncoderBlock2D"] * levels,
      "up_block_types": ["UpDecoderBlock2D"] * levels,
      "block_out_channels": list(cfg.block_out_channels),
      "layers_per_block": cfg.layers_per_block,
      "act_fn": "silu",
      "latent_channels": cfg.latent_channels,
      "norm_num_groups": cfg.norm_num_groups,
      "scaling_factor": cfg.scaling_factor,
      "mid_block_add_attention": cfg.mid_block_attention,
  }


def _torch_key(path: str) -> str:
  """Our dotted parameter path → the diffusers state-dict key."""
  module, leaf = path.rsplit(".", 1)
  parent, _, name = module.rpartition(".")
  if name in DIFFUSERS_ATTENTION:  # only the attention blocks have modules of these names
    module = f"{parent}.{DIFFUSERS_ATTENTION[name]}"
  return f"{module}.{'bias' if leaf == 'bias' else 'weight'}"


def _layout(path: str, ndim: int) -> str:
  return "same" if path.endswith(".embedding") else kernel_layout(ndim)  # the codebook is a table, not a kernel


def _to_ours(value: np.ndarray, path: str, like_ndim: int) -> np.ndarray:
  if like_ndim == 2 and value.ndim == 4 and value.shape[2:] == (1, 1):
    value = value[:, :, 0, 0]  # attention projections saved as 1×1 convs (original LDM)
  return from_torch(value, _layout(path, like_ndim))


def _param_ranks(model: nnx.Module) -> dict[str, int]:
  # Ranks, not values: the model may be abstract (nnx.eval_shape), holding only shapes.
  return {".".join(str(p) for p in path): len(var.get_value().shape) for path, var in nnx.iter_graph(model)
          if isinstance(var, nnx.Param)}


def _rename_old_attention(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for key, value in state.items():
    parts = key.split(".")
    if len(parts) >= 3 and "attentions" in parts and parts[-2] in _OLD_ATTENTION_NAMES:
      key = ".".join(parts[:-2] + [_OLD_ATTENTION_NAMES[parts[-2]], parts[-1]])
    out[key] = value
  return out


def load_state(model: AutoencoderKL | VQModel, state: dict[str, np.ndarray], source: str = "checkpoint") -> None:
  """Writes a diffusers AutoencoderKL (VQModel) state dict into `model`; any missing, extra or misshapen weight is
  an error."""
  state = _rename_old_attention(state)
  arrays, missing = {}, []
  for path, ndim in _param_ranks(model).items():
    key = _torch_key(path)
    if key not in state:
      missing.append(key)
      continue
    arrays[path] = _to_ours(np.asarray(state.pop(key)), path, ndim)
  if missing:
    raise WeightsError(f"{source} is missing {len(missing)} weights the model needs, e.g. {missing[:3]}")
  if state:
    extra = sorted(state)
    raise WeightsError(f"{source} has {len(extra)} weights the model does not use, e.g. {extra[:3]}")
  assign(model, arrays, source=source)
  # assign() writes numpy arrays; hand back device arrays so the model behaves like a freshly built one.
  for _, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      var.set_value(jnp.asarray(var.get_value()))


@register_loader("AutoencoderKL")
def load_vae(folder: str, config: dict, *, allow_pickle: bool = False, **kw: Any) -> AutoencoderKL:
  """An `AutoencoderKL` from a diffusers folder; `kw` may set `dtype` and `attention_impl`."""
  source = os.path.join(folder, "config.json")
  cfg = config_from_diffusers(config, source, **kw)
  state = read_folder(folder, allow_pickle=allow_pickle)
  # Shapes only: every parameter is about to be overwritten, so random initialisation would be wasted work.
  model = abstract_model(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
  load_state(model, state, source=folder)
  return model


@register_loader("VQModel")
def load_vq(folder: str, config: dict, *, allow_pickle: bool = False, **kw: Any) -> VQModel:
  """A `VQModel` from a diffusers folder; `kw` may set `dtype` and `attention_impl`."""
  cfg = vq_config_from_diffusers(config, os.path.join(folder, "config.json"), **kw)
  state = read_folder(folder, allow_pickle=allow_pickle)
  model = abstract_model(lambda: VQModel(cfg, rngs=nnx.Rngs(0)))
  load_state(model, state, source=folder)
  return model


def save_diffusers_vae(model: AutoencoderKL | VQModel, folder: str) -> None:
  """Writes `config.json` + `diffusion_pytorch_model.safetensors` that diffusers' `from_pretrained` reads."""
  arrays = {_torch_key(path): to_torch(value.astype(np.float32), _layout(path, value.ndim))
            for path, value in model_arrays(model).items()}
  if isinstance(model, VQModel) and model.quantize.ema_decay > 0:  # an EMA codebook is state, not a parameter
    arrays["quantize.embedding.weight"] = np.asarray(model.quantize.codebook, np.float32)
  os.makedirs(folder, exist_ok=True)
  save_safetensors(arrays, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config_to_diffusers(model.config), f, indent=2)
