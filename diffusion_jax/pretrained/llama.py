"""Llama and Qwen2 causal language models in and out of transformers folders.

  lm = pretrained.load("path/to/folder")       # LlamaForCausalLM / Qwen2ForCausalLM -> models.decoder.DecoderLM
  logits = lm(input_ids)                       # float32 [B, L, vocab]
  out = lm.generate(input_ids, max_new_tokens=32, stop_tokens=generation_defaults(folder)["eos_token_ids"])
  save_transformers(lm, "out/")                # transformers' AutoModelForCausalLM.from_pretrained("out/") reads it

Both families are one configuration of our `DecoderLM` (RMSNorm, SwiGLU, rotary positions, grouped-query heads); they
differ only in their biases: Llama's `attention_bias` covers q/k/v/o and `mlp_bias` the MLP, Qwen2 has biases on
q/k/v only. Our blocks have `qkv_bias` and `out_bias` (o and the MLP), so a Llama config whose two flags differ
cannot be represented and is refused rather than loaded wrong.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.models.decoder import DecoderConfig, DecoderLM
from diffusion_jax.models.tracing import abstract_model
from diffusion_jax.pretrained import class_name_of, register_loader
from diffusion_jax.pretrained.weights import (WeightsError, assign, from_torch, model_arrays, read_folder,
                                              save_safetensors, take, to_torch, torch_shape)

__all__ = ["assign_transformers", "config_from_transformers", "generation_defaults", "load_transformers",
           "save_transformers", "transformers_config", "transformers_state"]

# transformers' defaults for the fields a saved config may leave out (LlamaConfig / Qwen2Config); sizes have no
# default here: a config without them describes no particular model.
_DEFAULTS = {
    "LlamaForCausalLM": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                             max_position_embeddings=2048, hidden_act="silu"),
    "Qwen2ForCausalLM": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=32768,
                             hidden_act="silu", use_sliding_window=False),
}
_MODEL_TYPE = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
# A composite model's text_config (LLaVA's) names its family by model_type only.
_CLASS_OF_TYPE = {v: k for k, v in _MODEL_TYPE.items()}
_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
# Buffers some checkpoints saved with the weights; recomputed from the config, not parameters.
_IGNORED = re.compile(r"\.rotary_emb\.inv_freq$")


def _field(config: dict, defaults: dict, key: str) -> Any:
  value = config.get(key)
  return defaults[key] if value is None else value


def _rope_theta(config: dict, source: str) -> float:
  """The rotary base; transformers 5 keeps it in `rope_parameters`, older configs in `rope_theta`/`rope_scaling`.
  Scaled variants (linear, dynamic, yarn, llama3, ...) change the angles, so they are refused, not ignored."""
  params = dict(config.get("rope_scaling") or {})
  params.update(config.get("rope_parameters") or {})
  kind = params.get("rope_type", params.get("type", "default"))
  if kind != "default":
    raise WeightsError(f"{source}: rope type {kind!r} is not supported (only 'default' rotary positions)")
  theta = params.get("rope_theta", config.get("rope_theta"))
  return 10000.0 if theta is None else float(theta)


def config_from_transformers(config: dict, *, source: str = "config.json", **overrides) -> DecoderConfig:
  """Our `DecoderConfig` for a transformers LlamaConfig / Qwen2Config dict (a folder's, or a composite model's
  `text_config`, which has a model_type but no architectures); anything it cannot express is a one-line
  WeightsError."""
  name = class_name_of(config) or _CLASS_OF_TYPE.get(config.get("model_type"), "")
  if name not in _DEFAULTS:
    raise WeightsError(f"{source}: {name or config.get('model_type')!r} is not a Llama or Qwen2 language model")
  defaults = _DEFAULTS[name]
  missing = [k for k in _SIZES if config.get(k) is None]
  if missing:
    raise WeightsError(f"{source}: config.json lacks {', '.join(missing)}")
  act = _field(config, defaults, "hidden_act")
  if act != "silu":
    raise WeightsError(f"{source}: hidden_act {act!r} is not supported ({name} uses 'silu')")
  if name == "Qwen2ForCausalLM":
    if _field(config, defaults, "use_sliding_window") or "sliding_attention" in (config.get("layer_types") or ()):
      raise WeightsError(f"{source}: sliding-window attention is not supported")
    qkv_bias, out_bias = True, False
  else:
    attention_bias, mlp_bias = (bool(_field(config, defaults, k)) for k in ("attention_bias", "mlp_bias"))
    if attention_bias != mlp_bias:
      raise WeightsError(f"{source}: attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported "
                         "(our blocks bias q/k/v, and o with the MLP)")
    qkv_bias = out_bias = attention_bias
  width, heads = config["hidden_size"], config["num_attention_heads"]
  head_dim = config.get("head_dim")
  fields = dict(vocab_size=config["vocab_size"], width=width, layers=config["num_hidden_layers"], heads=heads,
                kv_heads=config.get("num_key_value_heads") or heads,
                head_dim=None if head_dim in (None, width // heads) else head_dim,
                mlp_dim=config["intermediate_size"], act="silu", gated_mlp=True, norm="rms",
                norm_eps=float(_field(config, defaults, "rms_norm_eps")), positions="rope",
                # Rotary positions have no table; max_len only carries the checkpoint's context length through.
                max_len=int(_field(config, defaults, "max_position_embeddings")),
                rope_theta=_rope_theta(config, source), qkv_bias=qkv_bias, out_bias=out_bias,
                tie_embeddings=bool(_field(config, defaults, "tie_word_embeddings")))
  fields.update(overrides)
  return DecoderConfig(**fields)


# Our block's names (models/transformer.py) against transformers' LlamaDecoderLayer's.
_HF_NAMES = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "attn.query": "self_attn.q_proj",
             "attn.key": "self_attn.k_proj", "attn.value": "self_attn.v_proj", "attn.out": "self_attn.o_proj",
             "mlp.gate": "mlp.gate_proj", "mlp.fc1": "mlp.up_proj", "mlp.fc2": "mlp.down_proj"}
_BLOCK = re.compile(r"^layers\.(\d+)\.(attn_norm|mlp_norm|attn\.\w+|mlp\.\w+)\.(kernel|bias|scale)$")
_TOP = {"token_embedding.embedding": "model.embed_tokens.weight", "final_norm.scale": "model.norm.weight",
        "lm_head.kernel": "lm_head.weight"}


def llama_key(path: str) -> tuple[str, str]:
  """Our dotted parameter path -> (transformers key, layout as `weights.from_torch` takes it)."""
  layout = "linear" if path.endswith(".kernel") else "same"
  if path in _TOP:
    return _TOP[path], layout
  m = _BLOCK.match(path)
  if m is None:
    raise WeightsError(f"parameter {path} has no transformers name")
  suffix = "bias" if m[3] == "bias" else "weight"
  return f"model.layers.{m[1]}.{_HF_NAMES[m[2]]}.{suffix}", layout


def assign_transformers(model: DecoderLM, state: dict[str, np.ndarray], source: str) -> None:
  """Fills `model` from a LlamaForCausalLM-layout state dict (`model.*`, `lm_head.weight`); every weight used
  exactly once, or a one-line error. Composite models (LLaVA) strip their own prefix and call this."""
  state = {k: v for k, v in state.items() if not _IGNORED.search(k)}
  if model.config.tie_embeddings and "lm_head.weight" in state:
    # Older saves wrote the tied head out as a copy of the embedding; a head that differs would be silently lost.
    head = state.pop("lm_head.weight")
    if not np.array_equal(head, state.get("model.embed_tokens.weight")):
      raise WeightsError(f"{source}: tie_word_embeddings is set but lm_head.weight differs from the embedding")
  arrays = {}
  for path, var in nnx.state(model, nnx.Param).flat_state():  # shapes only: the model may be abstract
    path = ".".join(str(p) for p in path)
    key, layout = llama_key(path)
    array = take(state, key, source)
    want = torch_shape(var.value.shape, layout)
    if array.shape != want:
      raise WeightsError(f"{source}: weight {key} has shape {tuple(array.shape)}, the model expects {tuple(want)}")
    arrays[path] = from_torch(array, layout)
  if state:
    raise WeightsError(f"{source} has {len(state)} weights the model does not use, e.g. {sorted(state)[:3]}")
  assign(model, arrays, source=source)
  nnx.update(model, jax.tree.map(jnp.asarray, nnx.state(model)))  # device arrays, as a fresh model holds


@register_loader("LlamaForCausalLM", "Qwen2ForCausalLM")
def load_transformers(folder: str, config: dict, *, allow_pickle: bool = False, dtype: Any = None,
                      attention_impl: Optional[str] = None) -> DecoderLM:
  """The `DecoderLM` a transformers Llama / Qwen2 causal-LM folder holds; `dtype` is the compute dtype.

  `lm(input_ids)` gives float32 logits, `lm.generate(input_ids, max_new_tokens=N)` greedy continuations that stop on
  nothing unless `stop_tokens` is passed (see `generation_defaults` for the folder's own end tokens).
  """
  cfg = config_from_transformers(config, source=folder, dtype=dtype, attention_impl=attention_impl)
  model = abstract_model(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))  # shapes only: the weights come from the file
  assign_transformers(model, read_folder(folder, allow_pickle=allow_pickle), source=folder)
  return model


def generation_defaults(folder: str) -> dict:
  """bos/eos/pad ids of a folder: generation_config.json wins over config.json, as in transformers' `generate`.

  `eos_token_ids` is always a tuple (chat models often end on several tokens), ready for `stop_tokens=`.
  """
  merged = {}
  for name in ("config.json", "generation_config.json"):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      with open(path) as f:
        merged.update({k: v for k, v in json.load(f).items() if v is not None})
  eos = merged.get("eos_token_id")
  eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
  return {"bos_token_id": merged.get("bos_token_id"), "eos_token_ids": eos, "pad_token_id": merged.get("pad_token_id")}


def transformers_config(cfg: DecoderConfig) -> dict:
  """The config.json dict of transformers' LlamaForCausalLM (biases everywhere or nowhere) or Qwen2ForCausalLM
  (q/k/v biases only) for `cfg`; any other DecoderLM configuration is a ValueError naming it."""
  shape = (cfg.norm, cfg.gated_mlp, cfg.act, cfg.positions)
  if shape != ("rms", True, "silu", "rope"):
    raise ValueError(f"transformers' Llama/Qwen2 need norm='rms', gated_mlp, act='silu', positions='rope'; this "
                     f"model has {shape}")
  if cfg.qkv_bias and not cfg.out_bias:
    arch, extra = "Qwen2ForCausalLM", {"use_sliding_window": False}
  elif cfg.qkv_bias == cfg.out_bias:
    arch, extra = "LlamaForCausalLM", {"attention_bias": cfg.qkv_bias, "mlp_bias": cfg.out_bias}
  else:
    raise ValueError("neither Llama nor Qwen2 has biases on the output projections but none on q/k/v")
  return {"architectures": [arch], "model_type": _MODEL_TYPE[arch], "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.width, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
          "num_key_value_heads": cfg.kv_heads or cfg.heads, "head_dim": cfg.head_dim or cfg.width // cfg.heads,
          "intermediate_size": cfg.mlp_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
          "max_position_embeddings": cfg.max_len, "tie_word_embeddings": cfg.tie_embeddings,
          "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, "dtype": "float32", **extra}


def transformers_state(model: DecoderLM) -> dict[str, np.ndarray]:
  """The model's float32 weights under LlamaForCausalLM's keys and in PyTorch's layout (no lm_head when tied)."""
  state = {}
  for path, value in model_arrays(model).items():
    key, layout = llama_key(path)
    state[key] = to_torch(value.astype(np.float32), layout)
  return state


def save_transformers(model: DecoderLM, folder: str) -> None:
  """Writes config.json + model.safetensors that transformers loads as LlamaForCausalLM or Qwen2ForCausalLM
  (see `transformers_config` for which DecoderLMs can be written)."""
  config = transformers_config(model.config)
  os.makedirs(folder, exist_ok=True)
  save_safetensors(transformers_state(model), os.path.join(folder, "model.safetensors"))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
