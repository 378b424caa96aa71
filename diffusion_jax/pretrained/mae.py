"""transformers `ViTMAEForPreTraining` folders → `models.mae.MAE`, and back.

  mae = pretrained.load("vit-mae-folder")        # dispatches here on `architectures`
  loss, pred, mask = mae(pixels_nhwc, noise=noise)   # as transformers returns loss, logits, mask
  save_transformers(mae, "out")

The encoder is the ViT tower `pretrained.vit` maps (`vit_key`, transformers 4 and 5 names); the decoder's blocks are
named like the encoder's under `decoder.decoder_layers`. The two fixed sin-cos tables (`vit.embeddings.
position_embeddings`, `decoder.decoder_pos_embed`) are read as they are stored, not recomputed.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np
from flax import nnx

from diffusion_jax.models.mae import MAE, MAEConfig
from diffusion_jax.pretrained import register_loader
from diffusion_jax.pretrained.clip import act_to_transformers, assign_transformers, hf_key, transformers_state, write_transformers
from diffusion_jax.pretrained.vit import _UNBATCHED, batched, v5_layout, vit_config_from_transformers, vit_key
from diffusion_jax.pretrained.weights import WeightsError, read_folder, take

MAE_DEFAULTS = {"decoder_hidden_size": 512, "decoder_num_hidden_layers": 8, "decoder_num_attention_heads": 16,
                "decoder_intermediate_size": 2048, "mask_ratio": 0.75, "norm_pix_loss": False}
_FIXED = {"vision_model.position_embedding": "vit.embeddings.position_embeddings",
          "decoder_pos_embed": "decoder.decoder_pos_embed"}
_MAE_UNBATCHED = {**_UNBATCHED, "decoder.mask_token": _UNBATCHED["vit.embeddings.cls_token"],
                  "decoder.decoder_pos_embed": _UNBATCHED["vit.embeddings.position_embeddings"]}
_DECODER_LAYER = re.compile(r"^decoder_layers\.(\d+)\.(.*)$")


def mae_key(path: str) -> tuple[str, str]:
  """Our dotted parameter path → (transformers 5 key, layout)."""
  if path.startswith("vision_model."):
    return vit_key(path)
  m = _DECODER_LAYER.match(path)
  if m:  # a decoder block is named as an encoder block, one level down
    key, layout = vit_key(f"vision_model.layers.{m[1]}.{m[2]}")
    return key.replace("vit.layers.", "decoder.decoder_layers.", 1), layout
  key, layout = hf_key(path)
  return f"decoder.{key}", layout


def mae_config_from_transformers(d: dict, source: str = "config.json", **overrides) -> MAEConfig:
  encoder, _ = vit_config_from_transformers(d, source, fixed_positions=True, **overrides)
  d = {**MAE_DEFAULTS, **d}
  try:
    return MAEConfig(encoder=encoder, decoder_width=int(d["decoder_hidden_size"]),
                     decoder_layers=int(d["decoder_num_hidden_layers"]),
                     decoder_heads=int(d["decoder_num_attention_heads"]),
                     decoder_mlp_dim=int(d["decoder_intermediate_size"]), mask_ratio=float(d["mask_ratio"]),
                     norm_pix_loss=bool(d["norm_pix_loss"]))
  except ValueError as e:
    raise WeightsError(f"{source}: {e}") from None


@register_loader("ViTMAEForPreTraining")
def load_mae(folder: str, config: dict, *, allow_pickle: bool = False, **kw: Any) -> MAE:
  """An `MAE` from a transformers folder; `kw` may set `dtype` and `attention_impl`."""
  from diffusion_jax.models.tracing import abstract_model
  source = f"{folder}/config.json"
  cfg = mae_config_from_transformers(config, source, **kw)
  state = v5_layout(read_folder(folder, allow_pickle=allow_pickle), _MAE_UNBATCHED)
  model = abstract_model(lambda: MAE(cfg, rngs=nnx.Rngs(0)))
  for ours, theirs in _FIXED.items():  # not parameters: placed before `assign_transformers` fills those
    value = take(state, theirs, folder)
    var = model.vision_model.position_embedding if ours.startswith("vision_model.") else model.decoder_pos_embed
    if tuple(value.shape) != tuple(var.value.shape):
      raise WeightsError(f"{folder}: weight {theirs} has shape {tuple(value.shape)}, the model expects "
                         f"{tuple(var.value.shape)}")
    var.value = np.asarray(value, np.float32)
  assign_transformers(model, state, folder, key=mae_key)
  return model


def save_transformers(mae: MAE, folder: str) -> None:
  """`config.json` + `model.safetensors` that transformers' `ViTMAEForPreTraining.from_pretrained` reads."""
  cfg, e = mae.config, mae.config.encoder
  state = transformers_state(mae, key=mae_key)
  state.update({_FIXED["vision_model.position_embedding"]: np.asarray(mae.vision_model.position_embedding.value),
                _FIXED["decoder_pos_embed"]: np.asarray(mae.decoder_pos_embed.value)})
  write_transformers(folder, {
      "architectures": ["ViTMAEForPreTraining"], "model_type": "vit_mae", "hidden_size": e.width,
      "num_hidden_layers": e.layers, "num_attention_heads": e.heads, "intermediate_size": e.mlp_dim,
      "hidden_act": act_to_transformers(e.act), "layer_norm_eps": e.layer_norm_eps, "image_size": e.image_size,
      "patch_size": e.patch_size, "num_channels": e.channels, "qkv_bias": True,
      "decoder_hidden_size": cfg.decoder_width, "decoder_num_hidden_layers": cfg.decoder_layers,
      "decoder_num_attention_heads": cfg.decoder_heads, "decoder_intermediate_size": cfg.decoder_mlp_dim,
      "mask_ratio": cfg.mask_ratio, "norm_pix_loss": cfg.norm_pix_loss}, batched(state, _MAE_UNBATCHED))


__all__ = ["load_mae", "mae_config_from_transformers", "mae_key", "save_transformers"]
