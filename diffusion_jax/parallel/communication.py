"""Communication per training step and device: counted in a compiled step, estimated from shardings, timed.

One convention throughout: *traffic* is the bytes one device sends per step when every collective runs as a ring
(the usual cost model; tree, torus and hierarchical algorithms move about as much per device). For a collective
over a group of n devices whose result has S bytes on each device:

  all-reduce          2(n-1)/n · S   (a reduce-scatter then an all-gather)
  all-gather          (n-1)/n · S    (S is the gathered array)
  reduce-scatter      (n-1) · S      (S is the shard each device keeps)
  all-to-all          (n-1)/n · S
  collective-permute  S

`compiled_collectives` reads the collectives of an SPMD-partitioned HLO module (`compiled.as_text()`);
`parameter_transfers` and `activation_transfers` estimate the same traffic from the parameter shardings and the
model's sizes, so that a mesh too large to compile can still be sized; `seconds` turns traffic into time with a
chip's published link bandwidth.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Sequence

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
# `name = shape op(`, where shape may be a tuple; async pairs appear as op-start/op-done.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s+"
                          rf"(?P<op>{'|'.join(COLLECTIVES)})(?P<phase>-start|-done)?\((?P<rest>.*)$")
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")


def ring_traffic(op: str, result_bytes: float, group_size: int) -> float:
  n = max(int(group_size), 1)
  if op == "all-reduce":
    return 2 * (n - 1) / n * result_bytes
  if op in ("all-gather", "all-to-all"):
    return (n - 1) / n * result_bytes
  if op == "reduce-scatter":
    return (n - 1) * result_bytes
  if op == "collective-permute":
    return float(result_bytes)
  raise ValueError(f"unknown collective {op!r}")


def _shape_bytes(shape: str) -> int:
  return sum(_DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in _ARRAY.findall(shape))


def _group_size(line: str, num_devices: int) -> int:
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)  # iota form: [groups, size]<=[...]
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)  # explicit form: {{0,1,..},{..}}
  if m and m.group(1):
    return len(m.group(1).split(","))
  return num_devices  # {} or absent: all devices


@dataclasses.dataclass
class Counted:
  count: int = 0
  result_bytes: int = 0
  traffic: float = 0.0


def compiled_collectives(hlo_text: str, num_devices: int) -> dict[str, Counted]:
  """Collectives of a partitioned HLO module by op: how many, their result bytes and their ring traffic.

  An async collective is counted once, at its `-done` (whose result is the collective's result). A collective
  inside a loop body is counted once, whatever the trip count (as XLA's own cost analysis does).
  """
  found = collections.defaultdict(Counted)
  started = {}  # name of an async -start → its group size (the -done names its start as its operand)
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    if m.group("phase") == "-start":
      started[m.group("name")] = _group_size(line, num_devices)
      continue
    if m.group("phase") == "-done":
      group = next((started[o] for o in re.findall(r"[\w.\-]+", m.group("rest")) if o in started), num_devices)
    else:
      group = _group_size(line, num_devices)
    op, size = m.group("op"), _shape_bytes(m.group("shape"))
    c = found[op]
    c.count += 1
    c.result_bytes += size
    c.traffic += ring_traffic(op, size, group)
  return dict(found)


@dataclasses.dataclass(frozen=True)
class Transfer:
  """One kind of estimated traffic: `op` over the mesh `axes` (a group of `group_size` devices)."""
  what: str
  op: str
  axes: tuple[str, ...]
  group_size: int
  traffic: float  # bytes each device sends per step


def _axes_of(entry) -> tuple[str, ...]:
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


def parameter_transfers(params: Sequence, specs: Sequence, logical: Sequence, mesh_shape: dict[str, int],
                        batch_axes: Sequence[str], gathers: int = 1, *, frozen: bool = False) -> list[Transfer]:
  """Traffic that follows from where parameters live: gathers before use, gradient reduction after.

  `params` are shaped leaves (ShapeDtypeStruct), `specs` their mesh PartitionSpecs and `logical` their logical
  axis names, in the same order. A parameter is computed with in the layout the strategy intends: split over
  'tensor' along a 'heads' or 'mlp' dimension (Megatron), whole otherwise; so each step gathers it from its stored
  shards over the other axes, and its gradient, a partial sum over the batch axes, is reduced back into its stored
  shard: reduce-scatter over the batch axes it is stored split over, all-reduce over the rest.

  `gathers`: 1 where XLA keeps the forward pass's gathered parameters alive for the backward pass (what it does
  without rematerialisation: it costs a gathered copy of the parameters in temporaries), 2 where the backward
  pass gathers them again (ZeRO-3; XLA does so inside rematerialised blocks).

  `frozen`: parameters the step reads but does not train (a frozen text tower or VAE): gathered, never reduced.
  """
  label = "frozen parameter all-gather" if frozen else "parameter all-gather"
  totals = collections.defaultdict(float)
  for x, spec, names in zip(params, specs, logical):
    size = math.prod(x.shape) * x.dtype.itemsize
    stored = [_axes_of(e) for e in tuple(spec)] + [()] * (len(x.shape) - len(tuple(spec)))
    names = tuple(names or ()) + (None,) * (len(x.shape) - len(tuple(names or ())))
    kept = tuple(a for e, name in zip(stored, names) if name in ("heads", "mlp") for a in e if a == "tensor")
    compute = size / math.prod(mesh_shape[a] for a in kept)  # bytes of the copy one device computes with
    gathered = tuple(a for e in stored for a in e if a not in kept and mesh_shape[a] > 1)
    if gathered:
      n = math.prod(mesh_shape[a] for a in gathered)
      totals[(label, "all-gather", gathered)] += gathers * ring_traffic("all-gather", compute, n)
    if frozen:
      continue
    scatter = tuple(a for a in gathered if a in batch_axes)
    reduce = tuple(a for a in batch_axes if a not in scatter and mesh_shape[a] > 1)
    if scatter:
      n = math.prod(mesh_shape[a] for a in scatter)
      totals[("gradient reduce-scatter", "reduce-scatter", scatter)] += ring_traffic("reduce-scatter", compute / n, n)
      compute /= n
    if reduce:
      n = math.prod(mesh_shape[a] for a in reduce)
      totals[("gradient all-reduce", "all-reduce", reduce)] += ring_traffic("all-reduce", compute, n)
  return [Transfer(what, op, axes, math.prod(mesh_shape[a] for a in axes), t)
          for (what, op, axes), t in totals.items()]


def activation_transfers(sites: Sequence[tuple[int, int, int]], batch_per_group: int, itemsize: int,
                         tensor: int) -> list[Transfer]:
  """Megatron tensor parallelism: each (count, tokens, width) site is `count` row-parallel layers (attention and
  MLP output projections) whose [batch, tokens, width] output is all-reduced over 'tensor' in the forward pass,
  and the matching column-parallel inputs whose gradient is all-reduced in the backward pass."""
  if tensor <= 1 or not sites:
    return []
  size = sum(count * tokens * width for count, tokens, width in sites) * batch_per_group * itemsize
  return [Transfer("activation all-reduce (forward + backward)", "all-reduce", ("tensor",), tensor,
                   2 * ring_traffic("all-reduce", size, tensor))]


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip numbers; bandwidths are bytes/s in one direction."""
  name: str
  peak_flops: float  # dense bf16
  hbm_bytes: float
  link_bandwidth: float  # within a TPU slice (ICI) or a GPU node (NVLink)
  network_bandwidth: float  # across GPU nodes (InfiniBand, per GPU); unused on a TPU slice
  devices_per_node: int  # 0: every device of the mesh shares the fast links (one TPU slice)
  source: str


CHIPS = {
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM, ICI 1200 GB/s bidirectional (4800 Gbps) per chip.
    "v5p": Chip("TPU v5p", 459e12, 95 * 2**30, 600e9, 600e9, 0, "cloud.google.com/tpu/docs/v5p"),
    # nvidia.com/en-us/data-center/h100 (SXM): 989 TFLOP/s dense bf16, 80 GB, NVLink 900 GB/s bidirectional; DGX H100:
    # 8 GPUs a node, one 400 Gb/s InfiniBand (ConnectX-7) port per GPU.
    "h100": Chip("H100 SXM", 989e12, 80e9, 450e9, 50e9, 8, "nvidia.com/en-us/data-center/h100, DGX H100"),
}


def crosses_nodes(axes: Sequence[str], mesh_shape: dict[str, int], devices_per_node: int) -> bool:
  """Whether a group over `axes` spans more than one node, devices being numbered with the last mesh axis
  fastest (as `mesh_utils.create_device_mesh` lays out a GPU mesh): a group stays inside a node when the mesh
  axes from its outermost axis inward hold at most `devices_per_node` devices."""
  if devices_per_node <= 0:
    return False
  names = list(mesh_shape)
  outer = min(names.index(a) for a in axes)
  return math.prod(mesh_shape[a] for a in names[outer:]) > devices_per_node


def seconds(transfer: Transfer, chip: Chip, mesh_shape: dict[str, int]) -> float:
  far = crosses_nodes(transfer.axes, mesh_shape, chip.devices_per_node)
  return transfer.traffic / (chip.network_bandwidth if far else chip.link_bandwidth)
