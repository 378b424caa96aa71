"""diffusers unCLIP parts ⇄ our NNX models: `PriorTransformer` folders (Karlo's `prior/`) and the decoder's
`UnCLIPTextProjModel` (`text_proj/`).

  prior = pretrained.load("karlo-v1-alpha/prior")          # models.prior.PriorTransformer
  text_proj = pretrained.load("karlo-v1-alpha/text_proj")  # models.unclip.UnCLIPTextProjModel
  save_diffusers_prior(prior, "out/prior")                 # loadable by diffusers' PriorTransformer.from_pretrained

Our modules carry diffusers' names, so the mapping is a list of (our path, diffusers key, layout) with a few renames
(our attention's query/key/value/out, the MLP's fc1/fc2 for diffusers' `ff.net.0.proj` / `ff.net.2`). Every config
field maps onto our config or is `dropout` (training only); an unknown one is a one-line `WeightsError`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models.prior import PriorConfig, PriorTransformer
from diffusion_jax.models.tracing import abstract_model
from diffusion_jax.models.unclip import UnCLIPTextProjConfig, UnCLIPTextProjModel
from diffusion_jax.pretrained import register_loader
from diffusion_jax.pretrained.weights import (DIFFUSERS_ATTENTION, WeightsError, arrays_from_pairs, assign,
                                              linear_pairs, model_arrays, norm_pairs, read_folder, save_safetensors,
                                              state_from_pairs)

__all__ = ["load_prior", "load_text_proj", "prior_config_from_diffusers", "prior_diffusers_config",
           "save_diffusers_prior", "save_diffusers_text_proj", "text_proj_config_from_diffusers"]

PRIOR_CLASS, TEXT_PROJ_CLASS = "PriorTransformer", "UnCLIPTextProjModel"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# PriorTransformer's constructor arguments and defaults (diffusers 0.42); a config.json may leave any out.
PRIOR_DEFAULTS = dict(
    num_attention_heads=32, attention_head_dim=64, num_layers=20, embedding_dim=768, num_embeddings=77,
    additional_embeddings=4, dropout=0.0, time_embed_act_fn="silu", norm_in_type=None, embedding_proj_norm_type=None,
    encoder_hid_proj_type="linear", added_emb_type="prd", time_embed_dim=None, embedding_proj_dim=None,
    clip_embed_dim=None)
# UnCLIPTextProjModel's; time_embed_dim and cross_attention_dim have no default there.
TEXT_PROJ_DEFAULTS = dict(clip_extra_context_tokens=4, clip_embeddings_dim=768, time_embed_dim=None,
                          cross_attention_dim=None)
_TRAINING_ONLY = {"dropout"}


def _fields(config: dict, defaults: dict, source: str) -> dict:
  """The config's fields over the class defaults; an unknown field is refused rather than guessed at."""
  unknown = sorted(k for k in config if not k.startswith("_") and k not in defaults)
  if unknown:
    raise WeightsError(f"{source}: unsupported field {unknown[0]}={config[unknown[0]]!r} (unknown to this loader)")
  return {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}


def _config(cls, fields: dict, source: str, overrides: dict):
  try:
    return cls(**fields, **overrides)
  except (TypeError, ValueError) as e:  # our config's check, e.g. an activation we lack: one line, naming the field
    raise WeightsError(f"{source}: unsupported config: {str(e).splitlines()[0]}") from None


def prior_config_from_diffusers(config: dict, source: str = "config.json", **overrides) -> PriorConfig:
  """The `PriorConfig` of a diffusers PriorTransformer config.json dict; `overrides` (dtype, attention_impl) win."""
  fields = {k: v for k, v in _fields(config, PRIOR_DEFAULTS, source).items() if k not in _TRAINING_ONLY}
  return _config(PriorConfig, fields, source, overrides)


def text_proj_config_from_diffusers(config: dict, source: str = "config.json", **overrides) -> UnCLIPTextProjConfig:
  fields = _fields(config, TEXT_PROJ_DEFAULTS, source)
  for field in ("time_embed_dim", "cross_attention_dim"):
    if fields[field] is None:
      raise WeightsError(f"{source}: {TEXT_PROJ_CLASS} config has no {field}")
  return _config(UnCLIPTextProjConfig, fields, source, overrides)


def _prior_pairs(cfg: PriorConfig) -> Iterator[tuple[str, str, str]]:
  """(our dotted path, diffusers key, layout) for every weight of a prior with this config."""
  yield from linear_pairs("time_embedding.linear_1")
  yield from linear_pairs("time_embedding.linear_2")
  yield from linear_pairs("proj_in")
  if cfg.embedding_proj_norm_type:
    yield from norm_pairs("embedding_proj_norm")
  yield from linear_pairs("embedding_proj")
  if cfg.encoder_hid_proj_type:
    yield from linear_pairs("encoder_hidden_states_proj")
  yield "positional_embedding", "positional_embedding", "same"
  if cfg.added_emb_type:
    yield "prd_embedding", "prd_embedding", "same"
  for i in range(cfg.num_layers):
    block = f"transformer_blocks.{i}"
    yield from norm_pairs(f"{block}.norm1")
    for ours, theirs in DIFFUSERS_ATTENTION.items():
      yield from linear_pairs(f"{block}.attn1.{ours}", f"{block}.attn1.{theirs}")
    yield from norm_pairs(f"{block}.norm3")
    yield from linear_pairs(f"{block}.ff.fc1", f"{block}.ff.net.0.proj")
    yield from linear_pairs(f"{block}.ff.fc2", f"{block}.ff.net.2")
  if cfg.norm_in_type:
    yield from norm_pairs("norm_in")
  yield from norm_pairs("norm_out")
  yield from linear_pairs("proj_to_clip_embeddings")
  yield "clip_mean", "clip_mean", "same"
  yield "clip_std", "clip_std", "same"


def _text_proj_pairs() -> Iterator[tuple[str, str, str]]:
  yield "learned_classifier_free_guidance_embeddings", "learned_classifier_free_guidance_embeddings", "same"
  for name in ("embedding_proj", "clip_image_embeddings_project_to_time_embeddings", "clip_extra_context_tokens_proj",
               "encoder_hidden_states_proj"):
    yield from linear_pairs(name)
  yield from norm_pairs("text_encoder_hidden_states_norm")


def _load(folder: str, build, pairs, allow_pickle: bool):
  # Abstract init: the checkpoint overwrites every parameter, so no random numbers are drawn.
  model = abstract_model(build)
  assign(model, arrays_from_pairs(read_folder(folder, allow_pickle=allow_pickle), pairs, folder), source=folder)
  nnx.update(model, jax.tree.map(jnp.asarray, nnx.state(model)))  # device arrays, as a fresh model holds
  return model


@register_loader(PRIOR_CLASS)
def load_prior(folder: str, config: dict, *, allow_pickle: bool = False, dtype: Any = None,
               attention_impl: Optional[str] = None) -> PriorTransformer:
  """Our `PriorTransformer` with the weights of a diffusers `PriorTransformer` folder (config.json + weights)."""
  cfg = prior_config_from_diffusers(config, os.path.join(folder, "config.json"), dtype=dtype,
                                    attention_impl=attention_impl)
  return _load(folder, lambda: PriorTransformer(cfg, rngs=nnx.Rngs(0)), _prior_pairs(cfg), allow_pickle)


@register_loader(TEXT_PROJ_CLASS)
def load_text_proj(folder: str, config: dict, *, allow_pickle: bool = False, dtype: Any = None,
                   attention_impl: Optional[str] = None) -> UnCLIPTextProjModel:
  """Our `UnCLIPTextProjModel` with the weights of a diffusers `text_proj/` folder. (It has no attention:
  `attention_impl` is taken, like every loader's, so a pipeline can pass its options to all components.)"""
  del attention_impl
  cfg = text_proj_config_from_diffusers(config, os.path.join(folder, "config.json"), dtype=dtype)
  return _load(folder, lambda: UnCLIPTextProjModel(cfg, rngs=nnx.Rngs(0)), _text_proj_pairs(), allow_pickle)


def prior_diffusers_config(cfg: PriorConfig) -> dict:
  """The diffusers config.json dict of a prior with this config (every field, dropout 0)."""
  fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in PRIOR_DEFAULTS}
  return {"_class_name": PRIOR_CLASS, **fields, "dropout": 0.0}


def _save(folder: str, config: dict, state: dict) -> None:
  os.makedirs(folder, exist_ok=True)
  save_safetensors(state, os.path.join(folder, WEIGHTS_NAME))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2)


def save_diffusers_prior(model: PriorTransformer, folder: str) -> None:
  """Writes `model` as a diffusers `PriorTransformer` folder (config.json + safetensors)."""
  cfg = model.config
  _save(folder, prior_diffusers_config(cfg), state_from_pairs(model_arrays(model), _prior_pairs(cfg)))


def save_diffusers_text_proj(model: UnCLIPTextProjModel, folder: str) -> None:
  """Writes `model` as a diffusers `UnCLIPTextProjModel` folder (config.json + safetensors)."""
  cfg = model.config
  config = {"_class_name": TEXT_PROJ_CLASS, **{k: getattr(cfg, k) for k in TEXT_PROJ_DEFAULTS}}
  _save(folder, config, state_from_pairs(model_arrays(model), _text_proj_pairs()))
