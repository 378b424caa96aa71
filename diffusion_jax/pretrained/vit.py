"""transformers `ViTForImageClassification` folders → `ViTClassifier`: the ViT image tower (`models.vit`, the one CLIP
uses: patch convolution with a bias, class token, learned positions, pre-norm blocks, no pre-layernorm) and a linear
head on the final-layer-normed class token.

  clf = pretrained.load("vit-folder")     # dispatches here on `architectures`
  logits = clf(pixels_nhwc)               # pixels normalised as the folder's image processor does (`models.vit`)
  save_transformers(clf, "out")           # and back, in transformers 5's names

transformers 5 names the blocks `vit.layers.{i}.attention.q_proj`, …; checkpoints saved by transformers 4 (the ones on
the hub) name them `vit.encoder.layer.{i}.attention.attention.query`, …; both load. Our parameters are named in
transformers' CLIP layout by `pretrained.clip.hf_key` and renamed from there (`vit_key`), one table for loading and
export.
"""
from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from flax import nnx

from diffusion_jax.models import layers
from diffusion_jax.models.vit import CLIPVisionConfig, ViTClassifier
from diffusion_jax.pretrained import register_loader
from diffusion_jax.pretrained.clip import (act_to_transformers, assign_transformers, hf_key, transformers_state,
                                           vision_config_from_transformers, write_transformers)
from diffusion_jax.pretrained.weights import WeightsError, read_folder

VIT_DEFAULTS = {"image_size": 224, "patch_size": 16, "num_channels": 3, "hidden_size": 768, "num_hidden_layers": 12,
                "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu", "layer_norm_eps": 1e-12}

_V4_TO_V5 = (  # transformers 4's block names → transformers 5's (the ViT's `encoder.layer`, MAE's `decoder_layers`)
    (re.compile(r"\.encoder\.layer\.(\d+)\."), r".layers.\1."),
    # what transformers 5's save_pretrained writes for MAE's decoder blocks (hub checkpoints say decoder_layers)
    (re.compile(r"\.decoder_encoder\.layer\.(\d+)\."), r".decoder_layers.\1."),
    (re.compile(r"\.(\d+)\.attention\.attention\.(query|key|value)\."), lambda m: f".{m[1]}.attention.{m[2][0]}_proj."),
    (re.compile(r"\.(\d+)\.attention\.output\.dense\."), r".\1.attention.o_proj."),
    (re.compile(r"\.(\d+)\.intermediate\.dense\."), r".\1.mlp.fc1."),
    (re.compile(r"\.(\d+)\.output\.dense\."), r".\1.mlp.fc2."),
)
_CLIP_TO_V5 = (  # transformers' CLIP vision names (what `hf_key` gives for our tower) → transformers 5's ViT names
    (re.compile(r"^vision_model\.post_layernorm\."), "vit.layernorm."),
    (re.compile(r"^vision_model\."), "vit."),
    (re.compile(r"\.embeddings\.class_embedding$"), ".embeddings.cls_token"),
    (re.compile(r"\.embeddings\.position_embedding\.weight$"), ".embeddings.position_embeddings"),
    (re.compile(r"\.embeddings\.patch_embedding\."), ".embeddings.patch_embeddings.projection."),
    (re.compile(r"\.encoder\.layers\.(\d+)\.self_attn\.out_proj\."), r".layers.\1.attention.o_proj."),
    (re.compile(r"\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\."), r".layers.\1.attention.\2_proj."),
    (re.compile(r"\.encoder\.layers\.(\d+)\.layer_norm1\."), r".layers.\1.layernorm_before."),
    (re.compile(r"\.encoder\.layers\.(\d+)\.layer_norm2\."), r".layers.\1.layernorm_after."),
    (re.compile(r"\.encoder\.layers\.(\d+)\.mlp\."), r".layers.\1.mlp."),
)
# transformers keeps these with leading axes of 1 ([1, 1, W] and [1, N, W]): (to ours, back to theirs)
_UNBATCHED = {"vit.embeddings.cls_token": (lambda v: v.reshape(-1), lambda v: v.reshape(1, 1, -1)),
              "vit.embeddings.position_embeddings": (lambda v: v[0], lambda v: v[None])}


def vit_key(path: str) -> tuple[str, str]:
  """Our dotted parameter path → (transformers 5 ViT key, layout): `hf_key`'s CLIP name, renamed."""
  key, layout = hf_key(path)
  for pattern, repl in _CLIP_TO_V5:
    key = pattern.sub(repl, key)
  return key, layout


def vit_config_from_transformers(d: dict, source: str = "config.json", **overrides) -> tuple[CLIPVisionConfig, int]:
  """(our tower config, number of labels) of a transformers `ViTConfig` dict."""
  if d.get("qkv_bias") is False:
    raise WeightsError(f"{source}: qkv_bias=false is not supported; the ViT blocks here have q/k/v biases")
  labels = d.get("id2label") or {}
  num_labels = len(labels) if labels else int(d.get("num_labels") or 2)
  cfg = vision_config_from_transformers(d, source=source, defaults=VIT_DEFAULTS, pre_norm=False, patch_bias=True,
                                        pooling="cls", **overrides)
  return cfg, num_labels


def v5_layout(state: dict[str, np.ndarray], unbatched: dict = _UNBATCHED) -> dict[str, np.ndarray]:
  """A ViT state dict (transformers 4 or 5 names) in transformers 5's names, the embeddings (`unbatched`'s keys)
  without their batch axis, as `vit_key` names our parameters."""
  out = {}
  for key, value in state.items():
    for pattern, repl in _V4_TO_V5:
      key = pattern.sub(repl, key)
    out[key] = unbatched[key][0](np.asarray(value)) if key in unbatched else value
  return out


def batched(state: dict[str, np.ndarray], unbatched: dict = _UNBATCHED) -> dict[str, np.ndarray]:
  """`v5_layout`'s inverse for the embeddings: transformers' leading axes of 1 put back."""
  return {k: unbatched[k][1](v) if k in unbatched else v for k, v in state.items()}


@register_loader("ViTForImageClassification")
def load_vit_classifier(folder: str, config: dict, *, allow_pickle: bool = False, **kw: Any) -> ViTClassifier:
  """A `ViTClassifier` from a transformers folder; `kw` may set `dtype` and `attention_impl`."""
  from diffusion_jax.models.tracing import abstract_model
  source = f"{folder}/config.json"
  cfg, num_labels = vit_config_from_transformers(config, source, **kw)
  state = v5_layout(read_folder(folder, allow_pickle=allow_pickle))
  state.pop("vit.pooler.dense.weight", None)  # a ViTModel's pooler, which classification does not use
  state.pop("vit.pooler.dense.bias", None)
  model = abstract_model(lambda: ViTClassifier(cfg, num_labels, rngs=nnx.Rngs(0)))
  assign_transformers(model, state, folder, key=vit_key)
  return model


def save_transformers(clf: ViTClassifier, folder: str) -> None:
  """`config.json` + `model.safetensors` that transformers' `ViTForImageClassification.from_pretrained` reads; a
  classifier that transformers' cannot express (mean pooling, pre-logits, a probe's norm, a CLIP-style tower) is a
  one-line ValueError."""
  cfg = clf.vision_model.config
  differs = [what for what, bad in (
      ("mean pooling", clf.pooling != "cls"), ("a pre-logits layer", clf.pre_logits is not None),
      ("a probe's BatchNorm", clf.probe_norm is not None), (f"{cfg.pooling!r} tower pooling", cfg.pooling != "cls"),
      ("a pre-layernorm", cfg.pre_norm), ("a patch embedding without bias", not cfg.patch_bias),
      ("fixed position embeddings", cfg.fixed_positions)) if bad]
  if differs:
    raise ValueError(f"transformers' ViTForImageClassification has no {differs[0]}; this classifier cannot be "
                     "exported to it")
  state = batched(transformers_state(clf, key=vit_key))
  num_labels = int(clf.classifier.kernel.shape[-1])
  write_transformers(folder, {
      "architectures": ["ViTForImageClassification"], "model_type": "vit", "hidden_size": cfg.width,
      "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads, "intermediate_size": cfg.mlp_dim,
      "hidden_act": act_to_transformers(cfg.act), "layer_norm_eps": cfg.layer_norm_eps, "image_size": cfg.image_size,
      "patch_size": cfg.patch_size, "num_channels": cfg.channels, "qkv_bias": True,
      "id2label": {str(i): f"LABEL_{i}" for i in range(num_labels)},
      "label2id": {f"LABEL_{i}": i for i in range(num_labels)}}, state)


__all__ = ["ViTClassifier", "batched", "v5_layout", "vit_key", "load_vit_classifier", "save_transformers", "vit_config_from_transformers"]
