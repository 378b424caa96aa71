"""diffusers `DiTTransformer2DModel` folders ⇄ our NNX `DiT`.

  from diffusion_jax import pretrained
  dit = pretrained.load("DiT-XL-2-256/transformer")     # x_nhwc, t, labels → NHWC, 2·C channels with learned sigma

diffusers stores a timestep/label embedder in every block (`transformer_blocks.i.norm1.emb`) because its
conversion script copied DiT's one shared embedder into each. When all copies agree the model shares one, as in
the paper; when they differ (a model trained in diffusers) it keeps one per block so the outputs still match.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator

import jax
import numpy as np
from flax import nnx

from diffusion_jax.models.dit import DiT, DiTConfig
from diffusion_jax.models.tracing import abstract_model
from diffusion_jax.pretrained import register_loader
from diffusion_jax.pretrained.weights import (DIFFUSERS_ATTENTION, WeightsError, assign, from_torch, model_arrays,
                                              linear_pairs, read_folder, save_safetensors, take, to_torch)

CLASS_NAME = "DiTTransformer2DModel"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# DiTTransformer2DModel's constructor defaults: a config.json may leave any of them out.
_DIFFUSERS_DEFAULTS = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": None, "num_layers": 28,
    "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": 32, "patch_size": 2,
    "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "upcast_attention": False,
    "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": 1e-5,
}
# Fields whose value changes the network; anything else must keep the value our DiT implements.
_REQUIRED = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
             "norm_elementwise_affine": False}
_EMB_PREFIX = "norm1.emb."


def config_from_diffusers(config: dict, source: str = "config.json", **overrides) -> DiTConfig:
  """The `DiTConfig` of a diffusers DiT config.json; options our DiT does not implement are a one-line error.

  `dropout` only matters in training and `upcast_attention` only in half precision, so both are accepted.
  """
  c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
  for field, want in _REQUIRED.items():
    if c[field] != want:
      raise WeightsError(f"{source}: {field}={c[field]!r} is not supported (only {want!r})")
  if not c["num_embeds_ada_norm"] or c["num_embeds_ada_norm"] < 1:
    raise WeightsError(f"{source}: num_embeds_ada_norm={c['num_embeds_ada_norm']!r} is not supported "
                       "(a positive number of classes)")
  size = c["sample_size"]
  if isinstance(size, (list, tuple)):
    if len(size) != 2 or size[0] != size[1]:
      raise WeightsError(f"{source}: sample_size={size!r} is not supported (square only)")
    size = size[0]
  in_ch = c["in_channels"]
  out_ch = c["out_channels"] or in_ch
  kwargs = dict(
      input_size=int(size), patch_size=c["patch_size"], in_channels=in_ch, out_channels=out_ch,
      hidden_size=c["num_attention_heads"] * c["attention_head_dim"], depth=c["num_layers"],
      num_heads=c["num_attention_heads"], mlp_ratio=4.0, num_classes=c["num_embeds_ada_norm"],
      learn_sigma=out_ch == 2 * in_ch, norm_eps=float(c["norm_eps"]), freq_shift=1.0)
  kwargs.update(overrides)
  return DiTConfig(**kwargs)


def _embedder_pairs(ours: str, theirs: str, cfg: DiTConfig) -> list[tuple[str, str, str]]:
  pairs = (linear_pairs(f"{ours}timestep_embedder.linear_1", f"{theirs}timestep_embedder.linear_1")
           + linear_pairs(f"{ours}timestep_embedder.linear_2", f"{theirs}timestep_embedder.linear_2"))
  if cfg.num_classes:
    pairs.append((f"{ours}class_embedder.embedding", f"{theirs}class_embedder.embedding_table.weight", "same"))
  return pairs


def _pairs(cfg: DiTConfig) -> Iterator[tuple[str, str, str]]:
  """(our dotted path, diffusers key, layout) for every weight except the shared embedder's."""
  yield "patch_embed.kernel", "pos_embed.proj.weight", "conv"
  yield "patch_embed.bias", "pos_embed.proj.bias", "same"
  for i in range(cfg.depth):
    ours, theirs = f"transformer_blocks.{i}.", f"transformer_blocks.{i}."
    if cfg.per_block_embedding:
      yield from _embedder_pairs(ours + "emb.", theirs + _EMB_PREFIX, cfg)
    yield from linear_pairs(ours + "adaln", theirs + "norm1.linear")
    for name, diffusers_name in DIFFUSERS_ATTENTION.items():
      yield from linear_pairs(f"{ours}attn1.{name}", f"{theirs}attn1.{diffusers_name}")
    yield from linear_pairs(ours + "ff_in", theirs + "ff.net.0.proj")
    yield from linear_pairs(ours + "ff_out", theirs + "ff.net.2")
  yield from linear_pairs("proj_out_1", "proj_out_1")
  yield from linear_pairs("proj_out_2", "proj_out_2")


def _embedders_agree(state: dict[str, np.ndarray], cfg: DiTConfig) -> bool:
  first = _embedder_pairs("", f"transformer_blocks.0.{_EMB_PREFIX}", cfg)
  for _, key0, _ in first:
    if key0 not in state:
      return True  # let the mapping name the missing key
    for i in range(1, cfg.depth):
      other = state.get(key0.replace("transformer_blocks.0.", f"transformer_blocks.{i}.", 1))
      if other is None or other.shape != state[key0].shape or not np.array_equal(other, state[key0]):
        return False
  return True


def dit_arrays_from_diffusers(state: dict[str, np.ndarray], cfg: DiTConfig,
                              source: str = "checkpoint") -> dict[str, np.ndarray]:
  """diffusers state dict → our dotted paths; consumes `state` and fails on anything left over."""
  state = dict(state)
  arrays = {ours: from_torch(take(state, theirs, source), layout) for ours, theirs, layout in _pairs(cfg)}
  if not cfg.per_block_embedding:
    for ours, theirs, layout in _embedder_pairs("emb.", f"transformer_blocks.0.{_EMB_PREFIX}", cfg):
      arrays[ours] = from_torch(take(state, theirs, source), layout)
      for i in range(1, cfg.depth):  # identical copies (checked by the caller or trusted by its override)
        take(state, theirs.replace("transformer_blocks.0.", f"transformer_blocks.{i}.", 1), source)
  if state:
    leftover = sorted(state)
    raise WeightsError(f"{source} has {len(leftover)} weights the model does not use, e.g. {leftover[:3]}")
  return arrays


@register_loader(CLASS_NAME)
def load_dit(folder: str, config: dict, *, allow_pickle: bool = False, **kw) -> DiT:
  """A `DiT` with the weights of a diffusers `DiTTransformer2DModel` folder.

  `kw` overrides `DiTConfig` fields that do not change the weights (dtype, attention_impl, per_block_embedding).
  """
  state = read_folder(folder, allow_pickle=allow_pickle)
  source = folder
  cfg = config_from_diffusers(config, os.path.join(folder, "config.json"), **kw)
  if "per_block_embedding" not in kw:
    cfg = dataclasses.replace(cfg, per_block_embedding=not _embedders_agree(state, cfg))
  arrays = dit_arrays_from_diffusers(state, cfg, source)
  # Abstract init: the checkpoint overwrites every parameter, so do not draw (possibly billions of) random numbers.
  model = abstract_model(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
  assign(model, arrays, source=source)
  # assign leaves host numpy arrays; make them device arrays like a freshly built model's.
  for _, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      var.value = jax.numpy.asarray(var.value)
  return model


def diffusers_config(cfg: DiTConfig) -> dict:
  """The config.json of the diffusers model equivalent to `cfg`; ValueError for what diffusers cannot express."""
  unsupported = []
  if cfg.context_dim:
    unsupported.append(f"context_dim={cfg.context_dim}")
  if not cfg.num_classes:
    unsupported.append("num_classes=0")
  if cfg.mlp_ratio != 4.0:
    unsupported.append(f"mlp_ratio={cfg.mlp_ratio}")
  if cfg.freq_shift != 1.0:
    unsupported.append(f"freq_shift={cfg.freq_shift}")
  if unsupported:
    raise ValueError(f"diffusers' {CLASS_NAME} cannot express {', '.join(unsupported)}")
  return {
      "_class_name": CLASS_NAME, "num_attention_heads": cfg.num_heads,
      "attention_head_dim": cfg.hidden_size // cfg.num_heads, "in_channels": cfg.in_channels,
      "out_channels": cfg.output_channels, "num_layers": cfg.depth, "dropout": 0.0, "norm_num_groups": 32,
      "attention_bias": True, "sample_size": cfg.input_size, "patch_size": cfg.patch_size,
      "activation_fn": "gelu-approximate", "num_embeds_ada_norm": cfg.num_classes, "upcast_attention": False,
      "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": cfg.norm_eps,
  }


def save_diffusers_dit(model: DiT, folder: str) -> None:
  """Writes `model` as a diffusers `DiTTransformer2DModel` folder (config.json + safetensors)."""
  cfg = model.config
  config = diffusers_config(cfg)
  ours = model_arrays(model)
  arrays = {theirs: to_torch(ours[o], layout) for o, theirs, layout in _pairs(cfg)}
  if not cfg.per_block_embedding:  # diffusers wants a copy of the shared embedder in every block
    for o, theirs, layout in _embedder_pairs("emb.", f"transformer_blocks.0.{_EMB_PREFIX}", cfg):
      for i in range(cfg.depth):
        arrays[theirs.replace("transformer_blocks.0.", f"transformer_blocks.{i}.", 1)] = to_torch(ours[o], layout)
  os.makedirs(folder, exist_ok=True)
  save_safetensors({k: np.asarray(v, np.float32) for k, v in arrays.items()}, os.path.join(folder, WEIGHTS_NAME))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
