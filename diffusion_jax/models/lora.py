"""LoRA adapters (Hu et al. 2021) on the linear and convolution layers of any model here:
y = W·x + b + s · B(A(dropout(x))).

`inject(model, cfg)` gives every `layers.Linear` and `layers.Conv` whose dotted module name matches `cfg.targets`
(regexes, or the presets of `PRESETS`) an `Adapter` named `lora`: A [in, r] drawn as peft draws it, B [r, out] zero,
so the adapted model starts equal to the base; s = alpha / r (or alpha / √r with rsLoRA). On a convolution A is a
convolution of the layer's kernel size, stride and padding into r channels and B a 1 × 1 convolution out of them
(peft's and kohya's LoCon layout): A [kh, kw, in, r], B [1, 1, r, out]. On an embedding table (`layers.Embed`) A
[num, r] is looked up by the ids and B [r, dim] maps the row; A starts at zero and B normal, as peft does. Adapter weights are `LoRAParam`s, so a
filter on that type trains only them while the base stays frozen and sharded as it was (A and B take the kernel's
logical axes on their outer side). `merge` folds s·A·B into the kernels in place and `unmerge` takes it back out;
replacing A and B by another adapter's (`load_adapter`) keeps every compiled program, since adapters are state, not
structure.

Parameter names: `<module>.lora.a`, `<module>.lora.b`. Convolutions outside `layers.conv` (patch embeddings, the
Inception and digit-judge networks) take none. The PyTorch names of a file (peft's `lora_A.weight` /
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

from diffusion_jax.models.layers import Conv, Embed, Linear

Adaptable = (Linear, Conv, Embed)

# Module-name regexes (matched against the end of the dotted name) of the presets.
PRESETS = {
    # every attention projection: the shared Attention's query/key/value/out (ViT, CLIP, LLM, DiT, U-Net blocks)
    "attention": r"^(?!(.*\.)?ff\.out$).*(^|\.)(query|key|value|out)$",  # not the U-Net feed-forward's `ff.out`
    "all-linear": r".*",  # every linear, convolution and embedding layer
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


def weight_of(layer: Linear | Conv | Embed) -> nnx.Param:
  """The weight an adapter changes: a layer's kernel, or an embedding's table."""
  return layer.embedding if isinstance(layer, Embed) else layer.kernel


class Adapter(nnx.Module):
  """scale · B(A(dropout(x))) for one linear, convolution or embedding layer; `merged` adapters add nothing (their
  product is in the weight)."""

  def __init__(self, base: Linear | Conv | Embed, cfg: LoRAConfig, *, rngs: nnx.Rngs):
    weight = weight_of(base)
    *window, d_in, d_out = weight.shape
    *_, axis_in, axis_out = _axes(weight)
    self.embedding = isinstance(base, Embed)
    if self.embedding:  # peft's default for embeddings: A zero, B standard normal
      init_a, init_b = nnx.initializers.zeros_init(), nnx.initializers.normal(1.0)
    else:  # and for layers: A kaiming-uniform with a = √5, i.e. U(±1/√fan_in); B zero
      bound = 1.0 / math.sqrt(d_in * math.prod(window))
      init_a = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
      init_b = nnx.initializers.zeros_init()
    ones = [1] * len(window)
    self.a = LoRAParam(nnx.with_partitioning(init_a, (None,) * len(window) + (axis_in, None))(
        rngs.params(), (*window, d_in, cfg.rank)))
    self.b = LoRAParam(nnx.with_partitioning(init_b, (None,) * len(window) + (None, axis_out))(
        rngs.params(), (*ones, cfg.rank, d_out)))
    # A convolution's A convolves as its base does; padding and strides are those of `nnx.Conv`.
    self.conv = ({"strides": _pair(base.strides), "padding": base.padding} if isinstance(base, Conv) else None)
    self.scale = float(cfg.scale)
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs) if cfg.dropout else None
    self.merged = False

  def delta(self) -> jax.Array:
    """The kernel change s·A·B, shaped as the kernel."""
    a, b = self.a[...], self.b[...]
    return self.scale * jnp.einsum("...ir,ro->...io", a, b.reshape(b.shape[-2:]))

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.embedding:  # x are ids
      return self.scale * (jnp.take(self.a[...], x, axis=0) @ self.b[...])
    h = self.dropout(x) if self.dropout is not None else x
    a, b = self.a[...].astype(h.dtype), self.b[...].astype(h.dtype)
    if self.conv is None:
      return self.scale * ((h @ a) @ b)
    h = jax.lax.conv_general_dilated(h, a, self.conv["strides"], self.conv["padding"],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return self.scale * (h @ b.reshape(b.shape[-2:]))


def _pair(value) -> tuple:
  return tuple(value) if isinstance(value, (tuple, list)) else (int(value), int(value))


def adapted(model: nnx.Module) -> dict[str, Linear | Conv | Embed]:
  """Dotted module name → each layer of `model` that carries an adapter."""
  return {name: module for name, module in layers_of(model).items() if getattr(module, "lora", None) is not None}


def layers_of(model: nnx.Module) -> dict[str, Linear | Conv | Embed]:
  """Dotted module name → each layer of `model` that can take an adapter (`layers.Linear`, `Conv`, `Embed`)."""
  out = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, Adaptable):
      out[".".join(str(p) for p in path)] = node
  return out


def inject(model: nnx.Module, cfg: LoRAConfig, *, rngs: nnx.Rngs, under: str = "") -> list[str]:
  """Adds an adapter to every linear, convolution or embedding layer (under the submodule `under`, '' for all) whose
  dotted name matches one of `cfg.targets`; returns their names. No match is a ValueError naming a few of the layers there are."""
  patterns = cfg.patterns()
  prefix = f"{under}." if under else ""
  layers = {n: m for n, m in layers_of(model).items() if n.startswith(prefix)}
  chosen = sorted(n for n in layers if any(p.search(n[len(prefix):]) for p in patterns))
  if not chosen:
    raise ValueError(f"LoRA targets {list(cfg.targets)} match no linear, convolution or embedding layer"
                     f"{' under ' + under if under else ''}; "
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
      weight = weight_of(module)
      weight[...] = weight[...] + module.lora.delta().astype(weight.dtype)
      module.lora.merged = True


def unmerge(model: nnx.Module) -> None:
  """`merge`'s inverse (to float rounding): the kernels back to the base, the adapters active again."""
  for module in adapted(model).values():
    if module.lora.merged:
      weight = weight_of(module)
      weight[...] = weight[...] - module.lora.delta().astype(weight.dtype)
      module.lora.merged = False


__all__ = ["Adapter", "LoRAConfig", "LoRAParam", "PRESETS", "adapted", "inject", "layers_of", "merge", "unmerge",
           "weight_of"]
