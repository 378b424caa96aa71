"""Device mesh and logical-axis sharding from the config.

The mesh axes are named in the config (`mesh.axes`, e.g. ('data', 'fsdp', 'tensor')) with sizes in
`mesh.shape`; one size may be -1 to take the remaining devices. Model code only names logical axes; the
`sharding.strategy` preset (`diffusion_jax.parallel.strategies`) with the `sharding.rules` overrides of the config
maps them to mesh axes, so a strategy is a config change.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax.config import ConfigError
from diffusion_jax.parallel import strategies


def resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  shape = list(shape)
  fill = [i for i, s in enumerate(shape) if s == -1]
  if len(fill) > 1:
    raise ConfigError(f"mesh.shape {tuple(shape)} has more than one -1")
  known = math.prod(s for s in shape if s != -1)
  if fill:
    if num_devices % known:
      raise ConfigError(f"mesh.shape {tuple(shape)} does not divide the {num_devices} available devices")
    shape[fill[0]] = num_devices // known
  if math.prod(shape) > num_devices:
    raise ConfigError(f"mesh.shape {tuple(shape)} needs {math.prod(shape)} devices but only {num_devices} exist")
  return tuple(shape)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A mesh with auto axis types (XLA propagates shardings), over the first prod(shape) devices."""
  devices = list(jax.devices() if devices is None else devices)
  axes = tuple(mesh_cfg.axes)
  if len(axes) != len(mesh_cfg.shape):
    raise ConfigError(f"mesh.axes {axes} and mesh.shape {tuple(mesh_cfg.shape)} differ in length")
  shape = resolve_shape(mesh_cfg.shape, len(devices))
  n = math.prod(shape)
  if n == len(devices):
    from jax.experimental import mesh_utils  # topology-aware order on TPU/GPU
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  else:
    grid = np.array(devices[:n]).reshape(shape)
  return Mesh(grid, axes)


def logical_rules(sharding_cfg) -> tuple[tuple[str, object], ...]:
  """Rules as a tuple of (logical name, mesh axis | tuple of mesh axes | None): the preset of
  `sharding.strategy` (default 'data') with the entries of `sharding.rules` replacing those of the same name."""
  return strategies.resolve_rules(sharding_cfg.strategy or "data", sharding_cfg.rules)


def logical_to_mesh(spec: Sequence[str | None], rules) -> P:
  table = dict(rules)
  return P(*(table.get(name) if name is not None else None for name in spec))


def _axes_of(entry) -> tuple[str, ...]:
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Makes a spec from the rules valid for an array of `shape` on `mesh`.

  A mesh axis may split only one dimension of an array. When the rules put it on several (a ('embed', 'embed')
  kernel; 'conv_in' and 'conv_out' both over 'fsdp') it stays on a dimension its size divides, preferring one
  whose rule lists it first (('fsdp', 'tensor') on 'embed' yields 'tensor' to a 'heads' dimension ruled 'tensor'),
  then the largest, then the first: that is how FSDP splits each parameter along its biggest logical dimension.
  A dimension then keeps the longest prefix of its mesh axes whose product divides it and drops the rest
  (e.g. a bias of size 1 under FSDP): such a tensor is small, and replicating it beats refusing the strategy.
  """
  ruled = [_axes_of(e) for e in tuple(spec)[:len(shape)]]
  ruled += [()] * (len(shape) - len(ruled))
  entries = [list(e) for e in ruled]
  for axis in dict.fromkeys(a for e in ruled for a in e):  # in order of appearance: the result is deterministic
    if axis not in mesh.shape:
      raise ConfigError(f"the sharding rules name mesh axis {axis!r}, which mesh.axes {tuple(mesh.shape)} lacks")
    holders = [i for i, e in enumerate(ruled) if axis in e]
    keep = max(holders, key=lambda i: (shape[i] % mesh.shape[axis] == 0, -ruled[i].index(axis), shape[i], -i))
    for i in holders:
      if i != keep:
        entries[i].remove(axis)
  fitted = []
  for dim, names in zip(shape, entries):
    kept, ways = [], 1
    for a in names:
      if dim % (ways * mesh.shape[a]):
        break
      kept.append(a)
      ways *= mesh.shape[a]
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*fitted)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of the leading (batch) dimension of every input array."""
  return NamedSharding(mesh, logical_to_mesh(("batch",), rules))


def batch_shards(mesh: Mesh, rules) -> int:
  """How many ways the batch dimension is split: the global batch must be a multiple of this."""
  axes = dict(rules).get("batch")
  axes = (axes,) if isinstance(axes, str) else (axes or ())
  return math.prod(mesh.shape[a] for a in axes)


def global_batch(sharding: NamedSharding, local_batch) -> dict:
  """This process's rows of a batch → global arrays sharded along the batch axes (works on 1 or N hosts)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
