"""LoRA adapters (Hu et al. 2021) on the linear layers of any model here: y = W·x + b + s · B(A(dropout(x))).

`inject(model, cfg)` gives every `layers.Linear` whose dotted module name matches `cfg.targets` (regexes, or the
presets of `PRESETS`) an `Adapter` named `lora`: A [in, r] drawn as peft draws it, B [r, out] zero, so the adapted
model starts equal to the base; s = alpha / r (or alpha / √r with rsLoRA). Adapter weights are `LoRAParam`s, so a
filter on that type trains only them while the base stays frozen and sharded as it was (A and B take the kernel's
logical axes on their outer side). `merge` folds s·A·B into the kernels in place and `unmerge` takes it back out;
replacing A and B by another adapter's (`load_adapter`) keeps every compiled program, since adapters are state, not
structure.

Parameter names: `<module>.lora.a`, `<module>.lora.b`. The PyTorch names of a file (peft's `lora_A.weight` /
`lora_B.weight` with `alpha` from its config) are mapped by the loaders of `pretrained/lora.py`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models.layers import Linear

# Module-name regexes (matched against the end of the dotted name) of the presets.
PRESETS = {
    # every attention projection: the shared Attention's query/key/value/out (ViT, CLIP, LLM, DiT, U-Net blocks)
    "attention": r"(^|\.)(query|key|value|out)$",
    "all-linear": r".*",
}


class LoRAParam(nnx.Param):
  """An adapter weight: the only trainable parameter of a LoRA run."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  rank: int
  alpha: float
  targets: Sequence[str] = ("attention",)  # regexes over dotted module names, or preset names
  dropout: float = 0.0
  rslora: bool = False  # scale alpha / sqrt(rank) (rsLoRA) instead of alpha / rank

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
    if not self.targets:
      raise ValueError("LoRA targets are empty: name modules by regex or a preset (" + ", ".join(PRESETS) + ")")
    self.patterns()

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def patterns(self) -> list[re.Pattern]:
    out = []
    for target in self.targets:
      pattern = PRESETS.get(target, target)
      try:
        out.append(re.compile(pattern))
      except re.error as e:
        raise ValueError(f"LoRA target {target!r} is not a preset ({', '.join(PRESETS)}) or a regex: {e}") from None
    return out


def _axes(var) -> tuple:
  names = var.get_metadata().get("out_sharding") or (None, None)
  return tuple(names)


class Adapter(nnx.Module):
  """scale · B(A(dropout(x))) for one linear layer; `merged` adapters add nothing (their product is in the kernel)."""

  def __init__(self, base: Linear, cfg: LoRAConfig, *, rngs: nnx.Rngs):
    d_in, d_out = base.kernel.shape
    axis_in, axis_out = _axes(base.kernel)
    # peft's default: A kaiming-uniform with a = √5, i.e. U(±1/√in); B zero.
    bound = 1.0 / math.sqrt(d_in)
    uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
    self.a = LoRAParam(nnx.with_partitioning(uniform, (axis_in, None))(rngs.params(), (d_in, cfg.rank)))
    self.b = LoRAParam(nnx.with_partitioning(nnx.initializers.zeros_init(), (None, axis_out))(
        rngs.params(), (cfg.rank, d_out)))
    self.scale = float(cfg.scale)
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs) if cfg.dropout else None
    self.merged = False

  def delta(self) -> jax.Array:
    """The kernel change s·A·B [in, out]."""
    return self.scale * (self.a[...] @ self.b[...])

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.dropout(x) if self.dropout is not None else x
    return self.scale * ((h @ self.a[...].astype(h.dtype)) @ self.b[...].astype(h.dtype))


def adapted(model: nnx.Module) -> dict[str, Linear]:
  """Dotted module name → each linear layer of `model` that carries an adapter."""
  return {name: module for name, module in _linears(model).items() if getattr(module, "lora", None) is not None}


def _linears(model: nnx.Module) -> dict[str, Linear]:
  out = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, Linear):
      out[".".join(str(p) for p in path)] = node
  return out


def inject(model: nnx.Module, cfg: LoRAConfig, *, rngs: nnx.Rngs, under: str = "") -> list[str]:
  """Adds an adapter to every linear layer (under the submodule `under`, '' for all) whose dotted name matches one of
  `cfg.targets`; returns their names. No match is a ValueError naming a few of the layers there are."""
  patterns = cfg.patterns()
  prefix = f"{under}." if under else ""
  layers = {n: m for n, m in _linears(model).items() if n.startswith(prefix)}
  chosen = sorted(n for n in layers if any(p.search(n[len(prefix):]) for p in patterns))
  if not chosen:
    raise ValueError(f"LoRA targets {list(cfg.targets)} match no linear layer{' under ' + under if under else ''}; "
                     f"there are e.g. {', '.join(sorted(layers)[:4]) or 'none'}")
  for name in chosen:
    if getattr(layers[name], "lora", None) is not None:
      raise ValueError(f"{name} already has a LoRA adapter")
    layers[name].lora = Adapter(layers[name], cfg, rngs=rngs)
  return chosen


def merge(model: nnx.Module) -> None:
  """Folds every adapter into its kernel in place (a merged model runs at the base model's cost)."""
  for module in adapted(model).values():
    if not module.lora.merged:
      module.kernel[...] = module.kernel[...] + module.lora.delta().astype(module.kernel.dtype)
      module.lora.merged = True


def unmerge(model: nnx.Module) -> None:
  """`merge`'s inverse (to float rounding): the kernels back to the base, the adapters active again."""
  for module in adapted(model).values():
    if module.lora.merged:
      module.kernel[...] = module.kernel[...] - module.lora.delta().astype(module.kernel.dtype)
      module.lora.merged = False


__all__ = ["Adapter", "LoRAConfig", "LoRAParam", "PRESETS", "adapted", "inject", "merge", "unmerge"]
