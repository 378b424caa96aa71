"""LoRA adapter files users have, onto our models: peft folders (`adapter_config.json` + `adapter_model.safetensors`,
what `PeftModel.save_pretrained` writes) and back, and diffusers' `pytorch_lora_weights.safetensors` (its
`save_lora_weights` and training scripts) for the Stable Diffusion U-Net and text encoder.

  model = pretrained.load("clip-text-folder")          # the base, in transformers' layout
  names = load_peft(model, "adapter-folder")           # adapters added where the file has them (or replaced)
  save_peft(model, "out")                              # a folder peft's `PeftModel.from_pretrained` reads
  save_diffusers_lora(unet, "out")                     # a file diffusers' `load_lora_weights` reads
  load_diffusers_lora(unet, "sd-lora-folder")          # the file's `unet.` adapters
  load_kohya_lora(unet, "style.safetensors")           # a kohya / A1111 file's `lora_unet_*` adapters

File keys are `base_model.model.<transformers module>.lora_A.weight` ([r, in]) and `.lora_B.weight` ([out, r])
(`.lora_embedding_A` / `_B` on embeddings); the module names come from the same rename table the base model's loader
uses (`key`, default `pretrained.clip.hf_key` with the tower's prefix: CLIP, SigLIP and their towers), so any model
whose loader names its layers can take them. `r`, `lora_alpha`, `use_rslora`, `rank_pattern` and `alpha_pattern` set each adapter's scale; DoRA, adapter
biases and fan-in-fan-out layouts are refused in one line.
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.models import lora
from diffusion_jax.models.layers import Embed
from diffusion_jax.pretrained.clip import hf_key, tower_prefix
from diffusion_jax.pretrained.weights import WeightsError, from_torch, read_file, save_safetensors, to_torch

PEFT_PREFIX = "base_model.model."
# peft's names: `lora_A.weight` / `lora_B.weight` of layers, `lora_embedding_A` / `lora_embedding_B` of embeddings
_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_(?:embedding_)?([AB])(?:\.default)?(?:\.weight)?$")
_REFUSED = {"use_dora": "DoRA", "lora_bias": "LoRA biases", "fan_in_fan_out": "fan-in-fan-out weights"}

Key = Callable[[str], tuple[str, str]]


def _their_names(model: nnx.Module, key: Key, prefix: Optional[str]) -> dict[str, str]:
  """Our dotted name → PyTorch module name of each adaptable layer; a bare tower's names without its prefix, as
  transformers 5 saves a bare CLIPTextModel / CLIPVisionModel and peft names its layers."""
  prefix = tower_prefix(model) if prefix is None else prefix
  out = {}
  for name, layer in lora.layers_of(model).items():
    theirs, _ = key(f"{prefix}{name}.{'embedding' if isinstance(layer, Embed) else 'kernel'}")
    if theirs.endswith(".weight"):
      module = theirs[: -len(".weight")]
      out[name] = module[len(prefix):] if prefix and module.startswith(prefix) else module
  return out


def module_names(model: nnx.Module, key: Key = hf_key, prefix: Optional[str] = None) -> dict[str, str]:
  """PyTorch module name → our dotted name of each adaptable layer (a bare tower's with and without its prefix)."""
  prefix = tower_prefix(model) if prefix is None else prefix
  out = {}
  for name, module in _their_names(model, key, prefix).items():
    out[module] = name
    if prefix:
      out[prefix + module] = name  # transformers 4 and full models keep the prefix
  return out


def _pattern_value(module: str, patterns: dict, default):
  for pattern, value in patterns.items():
    if re.search(rf"(^|\.){pattern}$", module):
      return value
  return default


def _check_config(cfg: dict, source: str) -> None:
  if cfg.get("peft_type", "LORA") != "LORA":
    raise WeightsError(f"{source}: peft_type {cfg.get('peft_type')!r} is not LORA")
  for field, what in _REFUSED.items():
    if cfg.get(field):
      raise WeightsError(f"{source}: {what} ({field}=true) are not supported")


def _pairs(state: dict, source: str, component: str = "") -> dict[str, dict[str, np.ndarray]]:
  """PyTorch module name → {'A': lora_A [r, in], 'B': lora_B [out, r]} of the keys under `component.`."""
  prefix = f"{component}." if component else ""
  pairs: dict[str, dict[str, np.ndarray]] = {}
  for name, value in state.items():
    if not name.startswith(prefix):
      continue
    m = _KEY.match(name[len(prefix):])
    if m is None:
      raise WeightsError(f"{source}: {name!r} is not a LoRA A/B weight")
    pairs.setdefault(m[1], {})[m[2]] = np.asarray(value, np.float32)
  return pairs


def _ours(value: np.ndarray) -> np.ndarray:
  """A PyTorch LoRA weight ([out, in] or [out, in, kh, kw]) in our layout ([in, out] or [kh, kw, in, out])."""
  return from_torch(value, "conv" if value.ndim == 4 else "linear")


def apply_pairs(model: nnx.Module, pairs: dict[str, dict[str, np.ndarray]], cfg: dict, source: str, *,
                key: Key = hf_key, prefix: Optional[str] = None, weight: float = 1.0,
                combine: bool = False) -> list[str]:
  """Adds the adapters `pairs` holds, each scaled by the peft-style `cfg` (r, lora_alpha, use_rslora, rank_pattern,
  alpha_pattern; alpha defaults to the rank) times `weight`; returns our names of the adapted layers. Where a layer
  already has an adapter, it is replaced (same rank: no recompilation) or, with `combine`, joined: the two become
  one adapter of the summed rank, [A₁ A₂] and [s₁B₁; w·s₂B₂] at scale 1, whose output is the sum of theirs (several
  adapters at once, each with its weight). Every pair must find its layer: a one-line WeightsError names the first
  that does not."""
  _check_config(cfg, source)
  ours = module_names(model, key, prefix)
  layers = lora.layers_of(model)
  done = []
  for module, ab in sorted(pairs.items()):
    if module not in ours:
      raise WeightsError(f"{source}: no linear or convolution layer of this model is named {module!r} (e.g. "
                         f"{', '.join(sorted(ours)[:3])})")
    if set(ab) != {"A", "B"}:
      raise WeightsError(f"{source}: {module} has lora_{'A' if 'A' in ab else 'B'} without its pair")
    layer = layers[ours[module]]
    base = lora.weight_of(layer)
    a, b = _ours(ab["A"]), _ours(ab["B"])
    rank = a.shape[-1]
    want_a, want_b = (*base.shape[:-1], rank), (*[1] * (base.ndim - 2), rank, base.shape[-1])
    if a.shape != want_a or b.shape != want_b:
      raise WeightsError(f"{source}: {module} has A {ab['A'].shape} and B {ab['B'].shape}, which do not fit its "
                         f"weight {tuple(base.shape)} (ours, {'HWIO' if base.ndim == 4 else 'IO'})")
    if rank != _pattern_value(module, cfg.get("rank_pattern") or {}, cfg.get("r") or rank):
      raise WeightsError(f"{source}: {module} has rank {rank}, its config says otherwise")
    alpha = float(_pattern_value(module, cfg.get("alpha_pattern") or {}, cfg.get("lora_alpha") or rank))
    spec = lora.LoRAConfig(rank=rank, alpha=alpha, targets=(re.escape(ours[module]) + "$",),
                           rslora=bool(cfg.get("use_rslora")))
    scale = float(spec.scale) * float(weight)
    if layer.lora is None:
      layer.lora = lora.Adapter(layer, spec, rngs=nnx.Rngs(0))
    elif layer.lora.merged:
      raise WeightsError(f"{source}: {ours[module]}'s adapter is merged into its kernel; unmerge it first")
    elif combine:
      old_a, old_b = np.asarray(layer.lora.a[...]), np.asarray(layer.lora.b[...]) * layer.lora.scale
      a, b, scale = np.concatenate([old_a, a], axis=-1), np.concatenate([old_b, b * scale], axis=-2), 1.0
    elif layer.lora.a.shape != a.shape:
      raise WeightsError(f"{source}: {ours[module]} already has an adapter of rank {layer.lora.a.shape[-1]}; load "
                         "with combine=True to add this one beside it, or onto the base model")
    layer.lora.scale = scale
    layer.lora.a.value = jnp.asarray(a, jnp.float32)
    layer.lora.b.value = jnp.asarray(b, jnp.float32)
    done.append(ours[module])
  return done


def load_peft(model: nnx.Module, folder: str, *, key: Key = hf_key, prefix: Optional[str] = None,
              weight: float = 1.0, combine: bool = False) -> list[str]:
  """A peft LoRA folder's adapters onto `model` (`apply_pairs`: `weight`, `combine`); returns our names of the
  adapted layers."""
  config_path = os.path.join(folder, "adapter_config.json")
  if not os.path.exists(config_path):
    raise WeightsError(f"{folder} holds no adapter_config.json (a peft LoRA folder)")
  with open(config_path) as f:
    cfg = json.load(f)
  _check_config(cfg, config_path)
  weights = os.path.join(folder, "adapter_model.safetensors")
  if not os.path.exists(weights):
    raise WeightsError(f"{folder} holds no adapter_model.safetensors (pickled adapter_model.bin is not read)")
  return apply_pairs(model, _pairs(read_file(weights), weights), cfg, weights, key=key, prefix=prefix, weight=weight,
                     combine=combine)


DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


def _component_key(component: str) -> Key:
  """The rename function of a Stable Diffusion component's loader: diffusers' U-Net names or transformers' CLIP's."""
  from diffusion_jax.pretrained.unet import diffusers_key
  return diffusers_key if component == "unet" else hf_key


def load_diffusers_lora(model: nnx.Module, path: str, component: str = "unet", *, key: Optional[Key] = None,
                        prefix: Optional[str] = None, weight: float = 1.0, combine: bool = False) -> list[str]:
  """The `component` part ('unet' or 'text_encoder') of a diffusers LoRA file — what `save_lora_weights` and the
  diffusers training scripts write: `pytorch_lora_weights.safetensors` (a folder holding it, or the file), keys
  `<component>.<module>.lora_A.weight` in peft's layout, the adapter config in the file's `lora_adapter_metadata`
  (without it, alpha = rank, as diffusers assumes) — onto our U-Net (`key` = `pretrained.unet.diffusers_key`) or
  CLIP text encoder (`pretrained.clip.hf_key`); `weight`, `combine` as `apply_pairs`. Returns our names of the
  adapted layers."""
  from safetensors import safe_open
  file = os.path.join(path, DIFFUSERS_FILE) if os.path.isdir(path) else path
  if not os.path.exists(file):
    raise WeightsError(f"{path} holds no {DIFFUSERS_FILE}")
  key = key or _component_key(component)
  try:
    with safe_open(file, "np") as f:
      meta = f.metadata() or {}
  except Exception as e:  # noqa: BLE001 — any unreadable header is one line
    raise WeightsError(f"{file} is not a readable safetensors file: {e}") from None
  try:
    stored = json.loads(meta.get("lora_adapter_metadata") or "{}")
  except json.JSONDecodeError as e:
    raise WeightsError(f"{file}: its lora_adapter_metadata is not JSON ({e})") from None
  cfg = {k[len(component) + 1:]: v for k, v in stored.items() if k.startswith(component + ".")}
  pairs = _pairs(read_file(file), file, component)
  if not pairs:
    raise WeightsError(f"{file} holds no {component} adapters")
  return apply_pairs(model, pairs, cfg, file, key=key, prefix=prefix, weight=weight, combine=combine)


_KOHYA = re.compile(r"^(lora_unet|lora_te\d?)_(\w+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
KOHYA_COMPONENTS = {"unet": "lora_unet", "text_encoder": "lora_te"}


def load_kohya_lora(model: nnx.Module, path: str, component: str = "unet", *, key: Optional[Key] = None,
                    prefix: Optional[str] = None, weight: float = 1.0, combine: bool = False) -> list[str]:
  """The `component` part of a kohya / A1111 LoRA file (`lora_unet_<module>` or `lora_te_<module>` with the dots of
  diffusers' or transformers' module name as underscores; `.lora_down.weight` = A, `.lora_up.weight` = B, `.alpha`
  per module, alpha = rank when absent) onto our U-Net or CLIP text encoder (`weight`, `combine` as `apply_pairs`). LoCon convolutions load; LyCORIS
  variants (LoHa, LoKr, DoRA scales) are refused in one line. Returns our names of the adapted layers."""
  if component not in KOHYA_COMPONENTS:
    raise ValueError(f"component must be one of {sorted(KOHYA_COMPONENTS)}, got {component!r}")
  if not os.path.isfile(path):
    raise WeightsError(f"{path} is not a LoRA file")
  key = key or _component_key(component)
  underscored = {}
  for module, name in module_names(model, key, prefix).items():
    underscored[module.replace(".", "_")] = module
  state = read_file(path)
  pairs: dict[str, dict[str, np.ndarray]] = {}
  alpha_pattern = {}
  for name, value in state.items():
    m = _KOHYA.match(name)
    if m is None:
      if name.startswith(("lora_unet_", "lora_te")):
        raise WeightsError(f"{path}: {name!r} is not a LoRA down/up/alpha weight (LoHa, LoKr and DoRA files are "
                           "not supported)")
      continue
    if not m[1].startswith(KOHYA_COMPONENTS[component]) or (component == "text_encoder" and m[1] not in
                                                             ("lora_te", "lora_te1")):
      continue
    module = underscored.get(m[2])
    if module is None:
      raise WeightsError(f"{path}: no linear or convolution layer of this model is named like '{m[1]}_{m[2]}'")
    if m[3] == "alpha":
      alpha_pattern[re.escape(module)] = float(np.asarray(value).reshape(-1)[0])
    else:
      pairs.setdefault(module, {})["A" if m[3].startswith("lora_down") else "B"] = np.asarray(value, np.float32)
  if not pairs:
    raise WeightsError(f"{path} holds no {component} adapters ({KOHYA_COMPONENTS[component]}_* keys)")
  return apply_pairs(model, pairs, {"alpha_pattern": alpha_pattern}, path, key=key, prefix=prefix, weight=weight,
                     combine=combine)


def _adapter_state(model: nnx.Module, key: Key, prefix: Optional[str], names: str) -> tuple[dict, dict]:
  """The model's (unmerged) adapters as PyTorch arrays keyed `names.format(module=...) + '.lora_A.weight'` etc., and
  the peft config that gives each layer its scale: its `alpha_pattern` entry over the common rank, so peft computes
  the same product."""
  theirs = _their_names(model, key, prefix)
  state, ranks, alphas = {}, {}, {}
  for name, layer in lora.adapted(model).items():
    if layer.lora.merged:
      raise ValueError(f"{name}'s adapter is merged into its kernel: unmerge before saving the adapters")
    module = theirs[name]
    for name_ab, value in (("A", layer.lora.a[...]), ("B", layer.lora.b[...])):
      value = np.asarray(value, np.float32)
      tail = f"lora_embedding_{name_ab}" if isinstance(layer, Embed) else f"lora_{name_ab}.weight"
      state[f"{names.format(module=module)}.{tail}"] = np.ascontiguousarray(
          to_torch(value, "conv" if value.ndim == 4 else "linear"))
    ranks[module] = int(layer.lora.a.shape[-1])
    alphas[module] = float(layer.lora.scale) * ranks[module]
  if not state:
    raise ValueError("the model has no LoRA adapters to save")
  rank = max(set(ranks.values()), key=list(ranks.values()).count)
  config = {"peft_type": "LORA", "r": rank, "lora_alpha": float(rank), "use_rslora": False, "lora_dropout": 0.0,
            "bias": "none", "target_modules": sorted(ranks),  # whole names: a suffix like to_out's "0" would match more
            "rank_pattern": {re.escape(m): r for m, r in ranks.items() if r != rank},
            "alpha_pattern": {re.escape(m): a for m, a in alphas.items()}}
  return state, config


def save_peft(model: nnx.Module, folder: str, *, key: Key = hf_key, prefix: Optional[str] = None,
              base_model_class: str = "") -> None:
  """The model's (unmerged) adapters as a peft LoRA folder, in the PyTorch module names `key` gives."""
  state, config = _adapter_state(model, key, prefix, PEFT_PREFIX + "{module}")
  config.update(inference_mode=True, base_model_name_or_path="",
                auto_mapping={"base_model_class": base_model_class} if base_model_class else None)
  os.makedirs(folder, exist_ok=True)
  save_safetensors(state, os.path.join(folder, "adapter_model.safetensors"))
  with open(os.path.join(folder, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)


def save_diffusers_lora(unet: nnx.Module, path: str, *, text_encoder: Optional[nnx.Module] = None) -> str:
  """The adapters of a U-Net (and a CLIP text encoder) as diffusers writes them: one `pytorch_lora_weights.safetensors`
  (in the folder `path`, or the file `path` when it ends in .safetensors) with `unet.` / `text_encoder.` peft keys and
  each component's adapter config in the `lora_adapter_metadata` header, which `load_lora_weights` and
  `load_diffusers_lora` read. Returns the file's path."""
  state, meta = {}, {}
  for component, model in (("unet", unet), ("text_encoder", text_encoder)):
    if model is None:
      continue
    arrays, config = _adapter_state(model, _component_key(component), None, component + ".{module}")
    state.update(arrays)
    meta.update({f"{component}.{k}": v for k, v in config.items()})
  file = path if path.endswith(".safetensors") else os.path.join(path, DIFFUSERS_FILE)
  save_safetensors(state, file, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
  return file


__all__ = ["apply_pairs", "load_diffusers_lora", "load_kohya_lora", "load_peft", "module_names", "save_diffusers_lora",
           "save_peft"]
