"""Named sharding strategies: presets of logical-axis → mesh-axis rules, picked by `sharding.strategy`.

Models name the logical axes of every parameter (see `diffusion_jax.models.layers`); a strategy says which mesh
axis each name is split over. `sharding.rules` in the config are per-name overrides applied on top of the preset,
so `strategy='fsdp'` with `rules=(('norm', None),)` is FSDP with replicated norm scales, and a config that spells
out every name (as older configs did) gets exactly its table whatever the strategy.

  data         batch over ('data', 'fsdp'); every parameter replicated.
  fsdp         batch over ('data', 'fsdp'); every parameter (hence its gradient and optimizer state) split over
               'fsdp' along its largest dimension the 'fsdp' size divides (`mesh.fit_spec` keeps a mesh axis
               on one dimension per tensor), gathered by XLA where it is used.
  tensor       batch over ('data', 'fsdp'); attention heads and feed-forward hidden units split over 'tensor'
               (Megatron-style: q/k/v and the first MLP layer by output, the out-projections by input).
               Convolutions, norms and embeddings stay replicated.
  fsdp_tensor  both: heads and MLP hidden over 'tensor', the other dimension of those kernels over 'fsdp';
               a tensor with one named dimension (bias, norm, convolution channels) split fsdp·tensor ways.

The mesh sizes come from `mesh.shape`; a strategy whose axis has size 1 degenerates to data parallelism.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np

from diffusion_jax.config import ConfigError

# Every logical name the models put on parameters (diffusion_jax.models.layers documents them).
PARAMETER_AXES = ("embed", "mlp", "heads", "vocab", "conv_in", "conv_out", "norm")
_BATCH = ("batch", ("data", "fsdp"))


def _preset(**targets) -> tuple[tuple[str, Any], ...]:
  return (_BATCH,) + tuple((name, targets.get(name)) for name in PARAMETER_AXES)


STRATEGIES = {
    "data": _preset(),
    "fsdp": _preset(**{name: "fsdp" for name in PARAMETER_AXES}),
    "tensor": _preset(heads="tensor", mlp="tensor"),
    # Every name over both axes, in order of preference: 'tensor' stays on the heads/MLP dimension and 'fsdp' on
    # the other one (`mesh.fit_spec` prefers the dimension whose rule lists the axis first); a tensor with only
    # one named dimension (a bias, a convolution kernel's channels) is stored split fsdp·tensor ways.
    "fsdp_tensor": _preset(**{name: ("fsdp", "tensor") for name in PARAMETER_AXES}
                           | dict(heads=("tensor", "fsdp"), mlp=("tensor", "fsdp"))),
}

# Above this many elements a parameter replicated under FSDP is an error (4 MiB in float32): small tensors
# (biases, norms, a 3-channel output conv) may stay whole, big ones defeat the point of FSDP.
DEFAULT_MIN_SHARDED_SIZE = 2**20


def preset(strategy: str) -> tuple[tuple[str, Any], ...]:
  if strategy not in STRATEGIES:
    raise ConfigError(f"unknown sharding.strategy {strategy!r}; expected one of {tuple(STRATEGIES)}")
  return STRATEGIES[strategy]


def resolve_rules(strategy: str, overrides: Sequence[Sequence[Any]] = ()) -> tuple[tuple[str, Any], ...]:
  """The preset of `strategy` with the (name, mesh axes) pairs of `overrides` replacing or adding entries."""
  table = dict(preset(strategy))
  for entry in overrides:
    if len(entry) != 2 or not isinstance(entry[0], str):
      raise ConfigError(f"sharding.rules entries are (logical name, mesh axes) pairs, got {entry!r}")
    name, target = entry
    table[name] = tuple(target) if isinstance(target, list) else target
  return tuple(table.items())


def uses_mesh_axis(rules, axis: str) -> bool:
  """Whether any parameter (non-batch) rule maps to mesh axis `axis`."""
  for name, target in rules:
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    if name != "batch" and axis in targets:
      return True
  return False


def _dotted(path) -> str:
  name = jax.tree_util.keystr(tuple(path), simple=True, separator=".")
  return name[: -len(".value")] if name.endswith(".value") else name


def replicated_parameters(params, shardings, min_size: int) -> list[tuple[str, tuple[int, ...], int]]:
  """(name, shape, elements) of every leaf of `params` with at least `min_size` elements whose sharding keeps a
  whole copy on every device, largest first."""
  flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  if len(flat_params) != len(flat_shardings):
    raise ValueError(f"{len(flat_params)} parameters but {len(flat_shardings)} shardings")
  found = []
  for (path, x), sharding in zip(flat_params, flat_shardings):
    size = math.prod(x.shape)
    if size >= min_size and sharding.is_fully_replicated:
      found.append((_dotted(path), tuple(x.shape), size))
  return sorted(found, key=lambda f: -f[2])


def assert_sufficiently_sharded(state, shardings, mesh, min_size: int = DEFAULT_MIN_SHARDED_SIZE,
                                axis: str = "fsdp") -> None:
  """Fails loudly when a parameter of `min_size` or more elements is replicated while the mesh has an `axis` to
  shard it over: under FSDP that parameter (and its optimizer state) would cost its full size on every device.

  `state` and `shardings` are matching pytrees (a `TrainState` or just its parameters; for a `TrainState` the
  parameters are checked, their optimizer state and EMA being sharded alike).
  """
  if min_size <= 0 or dict(mesh.shape).get(axis, 1) <= 1:
    return
  if hasattr(state, "params"):
    state, shardings = state.params, shardings.params
  found = replicated_parameters(state, shardings, min_size)
  if found:
    name, shape, size = found[0]
    others = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    raise ValueError(
        f"parameter {name} with shape {shape} ({size:,} elements) is replicated on every device although the mesh "
        f"has {axis}={mesh.shape[axis]}{others}: no dimension of it is named by a rule that maps to '{axis}' and "
        f"divisible by {mesh.shape[axis]}. Pick an {axis} size that divides one of its dimensions, add a rule for "
        f"its logical axes, or raise sharding.min_sharded_size (0 turns this check off).")


def check_state(sharding_cfg, rules, state, shardings, mesh) -> None:
  """The trainer's check: `assert_sufficiently_sharded` whenever the rules shard parameters over 'fsdp'."""
  min_size = int(sharding_cfg.min_sharded_size)
  if uses_mesh_axis(rules, "fsdp"):
    assert_sufficiently_sharded(state, shardings, mesh, min_size=min_size)


def bytes_per_device(tree, shardings) -> tuple[int, int]:
  """(total bytes, bytes on the most loaded device) of the arrays or ShapeDtypeStructs in `tree` placed with
  `shardings`, computed from the shard shapes alone (nothing is allocated)."""
  total = per_device = 0
  flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
  for x, sharding in zip(jax.tree.leaves(tree), flat_shardings):
    itemsize = np.dtype(x.dtype).itemsize
    total += math.prod(x.shape) * itemsize
    per_device += math.prod(sharding.shard_shape(x.shape)) * itemsize
  return total, per_device
