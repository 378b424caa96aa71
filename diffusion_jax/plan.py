"""`python -m diffusion_jax.plan --config configs/<name>.py[:arg] --mesh data=2,fsdp=4 [--config.key=value ...]`

Sizes a run before paying for it: per-device bytes of parameters, optimizer state, EMA and batch under the
config's `sharding.strategy` on a hypothetical mesh, and the compiled train step's arguments, temporaries
(activations, gradients, workspace) and FLOPs. Nothing is allocated: the trainer's state is abstract
(`jax.eval_shape`), and the step is lowered and compiled for as many fake CPU devices as the mesh has.

The per-device state bytes follow from the shardings alone and hold on any backend. The compiled numbers are
XLA:CPU's: a TPU or GPU compiler fuses and lays out buffers differently, so read temporaries as an estimate
(usually within a small factor). `--nocompile` skips the compile (seconds instead of minutes for big models), and
a process whose JAX backend already runs with fewer devices than the mesh reports the analytic bytes only.

Communication per step and device is estimated from the shardings (`diffusion_jax.parallel.communication`, whose
docstring states the ring convention) and, when compiled, also counted in the partitioned HLO. `--chip v5p|h100`
turns bytes into milliseconds with the chip's published bandwidths and sets them against the compute time at
`--mfu`; `--format=row` prints the plan as one Markdown table row (docs/scaling.md is built from such rows).
"""
from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
import time
from typing import Optional, Sequence

from absl import app, flags

from diffusion_jax.flags_util import define_config_flag, parse_flags, usage_error
from diffusion_jax.parallel import communication
from diffusion_jax.parallel.communication import CHIPS

_CONFIG = define_config_flag()
_MESH = flags.DEFINE_string("mesh", None, "Mesh axis sizes, e.g. 'data=2,fsdp=4' (axes not named have size 1).")
_COMPILE = flags.DEFINE_bool("compile", True, "Compile the train step on fake CPU devices to estimate temporaries "
                             "(activations); --nocompile reports the analytic state bytes only.")
_CHIP = flags.DEFINE_enum("chip", None, list(CHIPS), "Estimate step time on this chip: communication at its "
                          "published bandwidths, compute at --mfu of its peak.")
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the compute time (with --chip).")
_FORMAT = flags.DEFINE_enum("format", "report", ["report", "row"], "'row': one Markdown table row (columns in "
                            "`ROW_HEADER`).")


def parse_mesh(text: str, axes: Sequence[str]) -> tuple[int, ...]:
  """'data=2,fsdp=4' → sizes in the order of `axes`; an axis not named has size 1."""
  from diffusion_jax.config import ConfigError
  sizes = dict.fromkeys(axes, 1)
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, sep, value = part.partition("=")
    name = name.strip()
    if not sep or name not in sizes or not value.strip().isdigit() or int(value) < 1:
      raise ConfigError(f"--mesh entry {part!r} is not AXIS=SIZE with AXIS one of {tuple(axes)} and SIZE >= 1")
    sizes[name] = int(value)
  return tuple(sizes.values())


def batch_spec(config, sharding=None) -> dict:
  """The training batch the shared data pipeline yields (`diffusion_jax.data.transforms.ToModelInputs`), as
  ShapeDtypeStructs of the global batch: what the trainer compiles against."""
  import jax
  import jax.numpy as jnp
  d, n = config.data, int(config.train.batch_size)
  shapes = {"image": ((n, d.image_size, d.image_size, d.channels), jnp.float32),
            "tokens": ((n, d.max_text_len), jnp.int32), "label": ((n,), jnp.int32), "valid": ((n,), jnp.float32)}
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in shapes.items()}


@dataclasses.dataclass
class Plan:
  mesh: dict[str, int]
  strategy: str
  batch_size: int
  num_parameters: int
  rows: list[tuple[str, int, int]]  # (what, total bytes, bytes per device)
  replicated: list[tuple[str, tuple[int, ...], int]]  # large parameters left whole on every device
  min_sharded_size: int
  transfers: list[communication.Transfer]  # analytic traffic per step per device
  transfer_note: str = ""  # what the analytic estimate leaves out
  compiled: Optional[dict[str, float]] = None  # per-device bytes from XLA's memory analysis, and FLOPs
  collectives: Optional[dict[str, communication.Counted]] = None  # counted in the compiled step
  compile_note: str = ""
  flops: float = 0.0  # per device per step: XLA's count of the compiled step, else the unpartitioned step's / devices
  flops_note: str = ""

  def row(self, what: str) -> tuple[int, int]:
    return next((total, per) for name, total, per in self.rows if name == what)

  @property
  def traffic(self) -> float:
    return sum(t.traffic for t in self.transfers)

  @property
  def compiled_traffic(self) -> Optional[float]:
    return None if self.collectives is None else sum(c.traffic for c in self.collectives.values())


def _transfers(config, trainer, mesh_shape: dict[str, int]) -> tuple[list[communication.Transfer], str]:
  """Analytic traffic of one step: parameter gathers and gradient reduction, plus tensor-parallel activations."""
  import jax
  from flax import nnx
  from diffusion_jax.parallel import mesh as mesh_lib, strategies
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  batch = mesh_lib.logical_to_mesh(("batch",), trainer.rules)[0]
  batch_axes = (batch,) if isinstance(batch, str) else tuple(batch or ())
  gathers = 1 if config.model.remat in ("none", "", None) else 2
  transfers = []
  # Frozen parameters are gathered for the forward pass like trained ones, but have no gradient to reduce.
  for params, frozen in ((trainer.abstract_state.params, False), (trainer.abstract_frozen, True)):
    logical = jax.tree.leaves(nnx.get_partition_spec(params), is_leaf=lambda x: x is None or is_spec(x))
    leaves = jax.tree.leaves(params)
    transfers += communication.parameter_transfers(
        leaves, [x.sharding.spec for x in leaves], [tuple(p or ()) for p in logical], mesh_shape, batch_axes,
        gathers=1 if frozen else gathers, frozen=frozen)
  note = ""
  if mesh_shape.get("tensor", 1) > 1 and strategies.uses_mesh_axis(trainer.rules, "tensor"):
    sites = trainer.task.activation_sites()
    if sites is None:
      note = "tensor-parallel activation all-reduces not estimated for this model"
    else:
      shards = math.prod(mesh_shape[a] for a in batch_axes)
      itemsize = jax.numpy.dtype(config.model.compute_dtype or "float32").itemsize
      transfers += communication.activation_transfers(sites, int(config.train.batch_size) // shards, itemsize,
                                                      mesh_shape["tensor"])
      note = "activation all-reduces counted at attention/MLP outputs only (Megatron)"
  return transfers, note


def _unpartitioned_flops(trainer, batch) -> float:
  """FLOPs of the whole step from XLA's cost analysis of its lowered (unoptimized, unpartitioned) program: a
  trace, no compile, so it is cheap for any model."""
  import jax
  from diffusion_jax.train import compile_report
  strip = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  lowered = jax.jit(trainer._train_step).lower(jax.tree.map(strip, trainer.abstract_state),
                                               jax.tree.map(strip, trainer.abstract_frozen),
                                               jax.tree.map(strip, batch))
  return compile_report.compiled_flops(lowered)


def make_plan(config, *, compile: bool = True, count_flops: bool = False) -> Plan:
  """The memory and communication plan of `config` on its `mesh.shape` (no -1), compiling if enough devices
  exist. `count_flops` also counts the step's FLOPs when it is not compiled (a trace of the whole step)."""
  import jax
  from jax.sharding import AbstractMesh
  from diffusion_jax.config import ConfigError
  from diffusion_jax.parallel import mesh as mesh_lib, strategies
  from diffusion_jax.train import compile_report
  from diffusion_jax.train.trainer import Trainer

  shape = tuple(int(s) for s in config.mesh.shape)
  if any(s < 1 for s in shape):
    raise ConfigError(f"the planner needs every mesh size, got mesh.shape={shape}; give them with --mesh")
  n = math.prod(shape)
  note = ""
  if not compile:
    note = "not compiled (--nocompile)"
  elif jax.device_count() < n:
    compile, note = False, (f"not compiled: the {jax.device_count()} devices of this process are fewer than the "
                            f"mesh's {n} (run the planner as its own process)")
  mesh = (mesh_lib.make_mesh(config.mesh, jax.devices()[:n]) if compile
          else AbstractMesh(shape, tuple(config.mesh.axes)))

  min_size = int(config.sharding.min_sharded_size)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.sharding.min_sharded_size = 0  # report large replicated parameters instead of refusing the plan
  trainer = Trainer(config, tempfile.gettempdir(), mesh=mesh)
  state, shardings = trainer.abstract_state, trainer.state_shardings
  rows = [("parameters", *strategies.bytes_per_device(state.params, shardings.params)),
          ("optimizer state", *strategies.bytes_per_device(state.opt_state, shardings.opt_state))]
  if state.ema:
    rows.append(("EMA parameters", *strategies.bytes_per_device(state.ema, shardings.ema)))
  if jax.tree.leaves(trainer.abstract_frozen):
    rows.append(("frozen parameters", *strategies.bytes_per_device(trainer.abstract_frozen, trainer.frozen_shardings)))
  rows.append(("train state", sum(r[1] for r in rows), sum(r[2] for r in rows)))
  batch = batch_spec(config, trainer.batch_sharding)
  rows.append(("batch", *strategies.bytes_per_device(batch, {k: trainer.batch_sharding for k in batch})))
  replicated = []
  if strategies.uses_mesh_axis(trainer.rules, "fsdp") and dict(mesh.shape).get("fsdp", 1) > 1 and min_size > 0:
    replicated = strategies.replicated_parameters(state.params, shardings.params, min_size)

  transfers, transfer_note = _transfers(config, trainer, dict(mesh.shape))

  compiled = collectives = None
  flops, flops_note = 0.0, ""
  if compile:
    t0 = time.time()
    step = trainer.compile_train_step(batch)
    seconds = time.time() - t0
    flops, flops_note = compile_report.compiled_flops(step), "XLA:CPU cost analysis of the compiled step"
    collectives = communication.compiled_collectives(step.as_text(), n)
    try:
      m = step.memory_analysis()
      compiled = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                      aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes,
                      peak=m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                      + m.temp_size_in_bytes,
                      flops=flops, compile_seconds=seconds)
    except Exception as e:  # memory analysis is best-effort on some backends
      note = f"compiled in {seconds:.0f}s but XLA gave no memory analysis ({e})"
  elif count_flops:
    flops = _unpartitioned_flops(trainer, batch) / n
    flops_note = f"XLA's count of the unpartitioned step / {n} devices"
  return Plan(mesh=dict(mesh.shape), strategy=config.sharding.get("strategy", "data"),
              batch_size=int(config.train.batch_size),
              num_parameters=sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
              rows=rows, replicated=replicated, min_sharded_size=min_size, transfers=transfers,
              transfer_note=transfer_note, compiled=compiled, collectives=collectives, compile_note=note,
              flops=flops, flops_note=flops_note)


def human_bytes(n: float) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{int(n)} B"


def _axes(axes: Sequence[str], mesh: dict[str, int]) -> str:
  return "×".join(axes) + f" ({math.prod(mesh[a] for a in axes)})"


def format_plan(plan: Plan, title: str = "", chip: Optional[communication.Chip] = None, mfu: float = 0.4) -> str:
  devices = math.prod(plan.mesh.values())
  mesh = " ".join(f"{k}={v}" for k, v in plan.mesh.items())
  lines = [f"memory plan{': ' + title if title else ''}",
           f"mesh {mesh} ({devices} devices), sharding.strategy={plan.strategy!r}, global batch {plan.batch_size}, "
           f"{plan.num_parameters:,} parameters",
           f"  {'':<18}{'total':>14}{'per device':>14}"]
  lines += [f"  {what:<18}{human_bytes(total):>14}{human_bytes(per):>14}" for what, total, per in plan.rows]
  c = plan.compiled
  if c:
    lines.append(f"compiled train step, per device (XLA:CPU, {c['compile_seconds']:.0f}s to compile):")
    lines.append(f"  arguments {human_bytes(c['arguments'])}, outputs {human_bytes(c['outputs'])} "
                 f"({human_bytes(c['aliased'])} donated), temporaries {human_bytes(c['temporaries'])} "
                 f"(activations, gradients, workspace)")
    lines.append(f"  peak ≈ {human_bytes(c['peak'])}; {c['flops']:.3g} FLOPs per step per device")
  else:
    lines.append(f"compiled train step: {plan.compile_note}; per-device bytes above are analytic (from shardings)")
  if plan.replicated:
    lines.append(f"WARNING: {len(plan.replicated)} parameter(s) of >= {plan.min_sharded_size:,} elements stay "
                 "replicated on every device (the trainer refuses this; see sharding.min_sharded_size):")
    lines += [f"  {name} {shape}" for name, shape, _ in plan.replicated[:10]]

  lines.append("communication per step, bytes each device sends (ring algorithms; all-reduce 2(n-1)/n of its "
               "size, all-gather (n-1)/n of the gathered size, reduce-scatter (n-1) shards):")
  lines.append("  analytic, from the shardings (parameters gathered once a step, twice with model.remat):")
  for t in plan.transfers:
    lines.append(f"    {t.what + ' over ' + _axes(t.axes, plan.mesh):<56}{human_bytes(t.traffic):>14}")
  lines.append(f"    {'total':<56}{human_bytes(plan.traffic):>14}"
               + (f"  ({plan.transfer_note})" if plan.transfer_note else ""))
  if plan.collectives is not None:
    lines.append("  compiled, the collectives of the partitioned step (count, result bytes, traffic):")
    for op, k in sorted(plan.collectives.items()):
      lines.append(f"    {op:<22}{k.count:>6}{human_bytes(k.result_bytes):>14}{human_bytes(k.traffic):>14}")
    ratio = plan.compiled_traffic / plan.traffic if plan.traffic else float("nan")
    lines.append(f"    {'total':<42}{human_bytes(plan.compiled_traffic):>14}  (compiled / analytic = {ratio:.2f})")
  if chip is not None:
    lines += _chip_lines(plan, chip, mfu)
  return "\n".join(lines)


def _timing(plan: Plan, chip: communication.Chip, mfu: float) -> tuple[float, float]:
  """(compute seconds at `mfu`, communication seconds if none of it overlaps compute) of one step."""
  comm = sum(communication.seconds(t, chip, plan.mesh) for t in plan.transfers)
  return plan.flops / (chip.peak_flops * mfu), comm


def _chip_lines(plan: Plan, chip: communication.Chip, mfu: float) -> list[str]:
  compute, comm = _timing(plan, chip, mfu)
  lines = [f"on {chip.name} ({chip.peak_flops / 1e12:.0f} TFLOP/s bf16, links {chip.link_bandwidth / 1e9:.0f} GB/s"
           + (f", {chip.network_bandwidth / 1e9:.0f} GB/s across nodes of {chip.devices_per_node}"
              if chip.devices_per_node else "") + f" per direction; {chip.source}):"]
  lines.append(f"  compute {compute * 1e3:.3g} ms per step at {mfu:.0%} MFU ({plan.flops:.3g} FLOPs per device; "
               f"{plan.flops_note or 'not counted'})")
  for t in plan.transfers:
    far = communication.crosses_nodes(t.axes, plan.mesh, chip.devices_per_node)
    lines.append(f"  {t.what} over {_axes(t.axes, plan.mesh)}: {communication.seconds(t, chip, plan.mesh) * 1e3:.3g} "
                 "ms" + (" (across nodes)" if far else ""))
  lines.append(f"  communication {comm * 1e3:.3g} ms per step if none of it overlaps compute")
  state = plan.row("train state")[1] + plan.row("batch")[1]
  lines.append(f"  train state + batch {human_bytes(state)} of {human_bytes(chip.hbm_bytes)} HBM per device "
               "(activations not included)")
  return lines


ROW_HEADER = ("| strategy | mesh | parameters | optimizer state | EMA | batch | compiled temporaries "
              "| traffic (analytic) | traffic (compiled) | communication ms | compute ms |\n" + "|---" * 11 + "|")


def format_row(plan: Plan, chip: Optional[communication.Chip] = None, mfu: float = 0.4) -> str:
  """One Markdown row under `ROW_HEADER`: per-device bytes and traffic; '-' where not compiled or no chip."""
  mesh = ",".join(f"{k}={v}" for k, v in plan.mesh.items() if v > 1) or "1 device"
  per = lambda what: human_bytes(plan.row(what)[1]) if any(r[0] == what for r in plan.rows) else "-"
  cells = [plan.strategy, mesh, per("parameters"), per("optimizer state"), per("EMA parameters"), per("batch"),
           human_bytes(plan.compiled["temporaries"]) if plan.compiled else "-", human_bytes(plan.traffic),
           human_bytes(plan.compiled_traffic) if plan.collectives is not None else "-"]
  if chip is None:
    cells += ["-", "-"]
  else:
    compute, comm = _timing(plan, chip, mfu)
    cells += [f"{comm * 1e3:.3g}", f"{compute * 1e3:.3g}" if plan.flops else "-"]
  return "| " + " | ".join(cells) + " |"


def _parse_flags(argv):
  rest = parse_flags(argv)
  if _CONFIG.value is None or not _MESH.value:
    usage_error("--config and --mesh are required, e.g. --config configs/mnist_dit.py --mesh data=2,fsdp=4")
  return rest


def main(argv):
  del argv
  import jax
  from diffusion_jax.config import ConfigError
  config = _CONFIG.value
  chip = CHIPS[_CHIP.value] if _CHIP.value else None
  try:
    shape = parse_mesh(_MESH.value, config.mesh.axes)
    config.mesh.shape = shape
    if _COMPILE.value:
      # Fake CPU devices, as many as the mesh has: compiling needs a device per shard, not memory.
      jax.config.update("jax_platforms", "cpu")
      jax.config.update("jax_num_cpu_devices", math.prod(shape))
    plan = make_plan(config, compile=_COMPILE.value, count_flops=chip is not None)
  except ConfigError as e:
    usage_error(e)
  if _FORMAT.value == "row":
    print(format_row(plan, chip, _MFU.value))
  else:
    print(format_plan(plan, " ".join(sys.argv[1:]), chip, _MFU.value))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
