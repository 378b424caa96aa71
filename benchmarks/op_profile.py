"""Where a compiled JAX program spends its time on CPU, per kind of op and per phase (forward, backward, update).

Used by the benchmarks' `--profile` flag (`add_flag`): `enable()` (before the first computation) makes XLA write
every optimised HLO module as text; `measure(fn, modules)` runs `fn` under `jax.profiler.trace`, sums XLA:CPU's
thunk times per HLO instruction and sorts the instructions (`classify`) into kinds by what they compute (the opcodes
in a fusion, convolution windows, dot labels) and into phases by JAX's `op_name` metadata (`jvp(` forward,
`transpose(jvp(` backward, neither: the optimizer and EMA update, or the whole program when nothing is
differentiated); `Profile.table()` prints them.

Thunks run concurrently on XLA's thread pool, and YNNPACK's dots and Eigen's convolutions split over the threads
themselves (one thunk, several cores), so per-kind times are *thunk* times summed over threads, and how many cores
the process kept busy comes from its CPU time over the wall time. An Eigen convolution or dot (a bare `convolution`
or `dot` thunk, as `diffusion_jax/xla_cpu.py` makes the convolutions) runs asynchronously: its trace event covers the
launch only, so it is timed from its launch to the first start of a thunk that reads its result (`_async_ends`).
"""
from __future__ import annotations

import atexit
import bisect
import collections
import glob
import gzip
import json
import os
import re
import shutil
import tempfile
import time
from typing import Callable, Optional

import jax

from benchmarks.common import fmt, markdown_table

_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<type>.*?) (?P<op>[a-z][\w\-]*)\((?P<rest>.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(?P<name>[\w.\-]+) ")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_WINDOW = re.compile(r"window=\{size=([\dx]+)")
_DIM_LABELS = re.compile(r"dim_labels=\w+_\w+->(\w+)")
_SHAPE = re.compile(r"\[([\d,]*)\]")
_OPERANDS = re.compile(r"%([\w.\-]+)")
CONTAINERS = {"while", "call", "conditional"}
ASYNC = {"convolution", "dot"}  # Eigen's thunks: the event is the launch; the work finishes on the thread pool
NO_THUNK = {"bitcast", "tuple", "get-tuple-element"}  # a reader behind one of these is the one that waits
LAYOUT_ONLY = {"transpose", "copy", "bitcast", "parameter", "reshape", "broadcast", "slice", "concatenate", "pad",
               "tuple", "get-tuple-element", "constant", "dynamic-slice", "dynamic-update-slice", "reverse"}
# models.attention.attend names its ops "attention" (a jvp shows it as "jvp(attention)"); jax's own kernel's einsums
# carry their BTNH/BNTS labels.
ATTENTION_LABELS = ("/attention/", "(attention)", "BTNH", "BNTS")
KINDS = ("conv forward", "conv input-grad", "conv weight-grad", "attention matmuls", "dense matmuls",
         "transpose / copy", "reductions (norm stats, bias grads)", "elementwise (norms, activations, residuals)",
         "other")
PHASES = ("forward", "backward", "update", "unlabelled")


def enable(dump_dir: str) -> None:
  """Makes XLA write each optimised HLO module to `dump_dir`; call before JAX's backend starts."""
  flags = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = f"{flags} --xla_dump_to={dump_dir} --xla_dump_hlo_as_text".strip()


class _Instr:
  __slots__ = ("name", "op", "type", "rest", "calls", "op_name")

  def __init__(self, m):
    self.name, self.op, self.type, self.rest = m["name"], m["op"], m["type"], m["rest"]
    self.calls = _CALLS.findall(self.rest)
    found = _OP_NAME.search(self.rest)
    self.op_name = found.group(1) if found else ""


def parse_module(text: str) -> tuple[str, tuple[dict, dict]]:
  """(module name, (instructions by name, each computation's instructions)) of an optimised HLO module's text
  (a dump file, or `compiled.as_text()`)."""
  instrs, comps, current = {}, {}, None
  lines = text.splitlines()
  name = lines[0].split()[1].rstrip(",") if lines and lines[0].startswith("HloModule") else "?"
  for line in lines[1:]:
    m = _INSTRUCTION.match(line)
    if m and current is not None:
      ins = _Instr(m)
      instrs[ins.name] = ins
      comps[current].append(ins)
      continue
    c = _COMPUTATION.match(line)
    if c:
      current = c["name"]
      comps[current] = []
  return name, (instrs, comps)


def parse_modules(dump_dir: str) -> dict[str, tuple[dict, dict]]:
  """`parse_module` of every optimised module XLA wrote to `dump_dir` (see `enable`), by module name."""
  modules = {}
  for path in sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt"))):
    with open(path) as f:
      name, parsed = parse_module(f.read())
    modules[name] = parsed
  return modules


def _inner(ins: _Instr, comps: dict, seen=None) -> list[_Instr]:
  """`ins` and every instruction of the computations it fuses (not of while bodies: those are timed apart)."""
  out = [ins]
  if ins.op == "fusion":
    seen = seen if seen is not None else set()
    for c in ins.calls:
      if c not in seen:
        seen.add(c)
        for sub in comps.get(c, []):
          out.extend(_inner(sub, comps, seen))
  return out


def _readers(comps: dict) -> dict[str, list[str]]:
  """Each instruction's readers: the instructions of its computation that take it as an operand."""
  readers = collections.defaultdict(list)
  for instrs in comps.values():
    names = {i.name for i in instrs}
    for i in instrs:
      for operand in set(_OPERANDS.findall(i.rest.split(")", 1)[0])) & names:
        readers[operand].append(i.name)
  return readers


def _async_ends(events: list, modules: dict) -> dict[int, float]:
  """End time (µs) of each asynchronous thunk's event (by index in `events`): the first start, after its launch, of
  a thunk reading its result, looking through `NO_THUNK` instructions; thunks whose reader never ran keep theirs."""
  starts = collections.defaultdict(list)
  for e in events:
    starts[(e["args"].get("hlo_module", ""), e["args"]["hlo_op"])].append(e["ts"])
  for ts in starts.values():
    ts.sort()
  readers = {name: _readers(comps) for name, (_, comps) in modules.items()}
  ends = {}
  for index, e in enumerate(events):
    module, name = e["args"].get("hlo_module", ""), e["args"]["hlo_op"]
    instrs = modules.get(module, ({}, {}))[0]
    if name not in instrs or instrs[name].op not in ASYNC:
      continue
    first, todo, seen = None, list(readers[module].get(name, [])), set()
    while todo:
      reader = todo.pop()
      if reader in seen:
        continue
      seen.add(reader)
      if reader in instrs and instrs[reader].op in NO_THUNK:
        todo.extend(readers[module].get(reader, []))
        continue
      later = starts.get((module, reader), [])
      k = bisect.bisect_left(later, e["ts"])
      if k < len(later) and (first is None or later[k] < first):
        first = later[k]
    ends[index] = max(e["ts"] + e["dur"], first if first is not None else 0.0)
  return ends


def _phase(inner: list[_Instr], differentiated: bool) -> str:
  votes = collections.Counter()
  for i in inner:
    if "transpose(jvp" in i.op_name:
      votes["backward"] += 1
    elif "jvp(" in i.op_name:
      votes["forward"] += 1
    elif i.op_name.startswith("jit("):
      votes["update" if differentiated else "forward"] += 1
  return votes.most_common(1)[0][0] if votes else "unlabelled"


def _conv_kind(conv: _Instr, phase: str) -> str:
  window = _WINDOW.search(conv.rest)
  labels = _DIM_LABELS.search(conv.rest)
  shape = _SHAPE.search(conv.type)
  if window and labels and shape:
    size = [int(s) for s in window.group(1).split("x")]
    dims = [int(s) for s in shape.group(1).split(",") if s]
    spatial = [dims[labels.group(1).index(str(k))] for k in range(len(size)) if str(k) in labels.group(1)]
    # A weight gradient is a convolution of the activations by the output gradient: its window is the image,
    # its output the (small) kernel.
    if spatial and all(w > s for w, s in zip(size, spatial)):
      return "conv weight-grad"
  return "conv input-grad" if phase == "backward" else "conv forward"


def classify(ins: _Instr, comps: dict, differentiated: bool = True) -> tuple[str, str]:
  """(kind, phase) of a timed top-level instruction; `differentiated`: whether its module takes a gradient (if
  not, everything it runs is forward)."""
  inner = _inner(ins, comps)
  phase = _phase(inner, differentiated)
  if phase == "unlabelled" and not differentiated:
    phase = "forward"
  ops = {i.op for i in inner} - {"fusion"}
  convs = [i for i in inner if i.op == "convolution"]
  if convs:
    if not differentiated:  # a convolution with a window larger than a tiny map is still a forward one here
      return "conv forward", phase
    kind = _conv_kind(convs[0], phase)
    return kind, ("backward" if kind != "conv forward" else phase)
  if "dot" in ops:
    attention = any(label in i.op_name for i in inner for label in ATTENTION_LABELS)
    return ("attention matmuls" if attention else "dense matmuls"), phase
  if ops <= LAYOUT_ONLY:
    return "transpose / copy", phase
  if "reduce" in ops or "reduce-window" in ops:
    return "reductions (norm stats, bias grads)", phase
  if ops & {"rng-bit-generator", "sort", "custom-call", "scatter", "gather", "all-reduce"}:
    return "other", phase
  return "elementwise (norms, activations, residuals)", phase


class Profile:
  """Thunk seconds per (kind, phase) over `calls` traced calls, the wall time they took, and the top instructions."""

  def __init__(self, seconds: dict, wall: float, calls: int, top: list, threads: int, cpu: float):
    self.seconds, self.wall, self.calls, self.top, self.threads, self.cpu = seconds, wall, calls, top, threads, cpu

  @property
  def busy(self) -> float:
    return sum(self.seconds.values())

  def table(self) -> str:
    phases = [p for p in PHASES if any(s for (k, ph), s in self.seconds.items() if ph == p)]
    rows = []
    for kind in KINDS:
      per = [self.seconds.get((kind, p), 0.0) for p in phases]
      if sum(per) == 0:
        continue
      rows.append([kind] + [fmt(1e3 * s / self.calls) if s else "-" for s in per]
                  + [fmt(1e3 * sum(per) / self.calls), f"{100 * sum(per) / self.busy:.1f}%"])
    total = [sum(self.seconds.get((k, p), 0.0) for k in KINDS) for p in phases]
    rows.append(["**all**"] + [fmt(1e3 * s / self.calls) for s in total] + [fmt(1e3 * self.busy / self.calls),
                                                                             "100%"])
    return markdown_table(["op kind (thunk ms per call)"] + phases + ["total", "share"], rows)

  def summary(self) -> str:
    return (f"{fmt(1e3 * self.wall / self.calls)} ms wall per call; the process used {self.cpu / self.wall:.2f} cores "
            f"(CPU time over wall, tracing included); {fmt(1e3 * self.busy / self.calls)} ms of thunk time, "
            f"{self.busy / self.wall:.2f} thunks running at a time on average, on {self.threads} threads")

  def top_lines(self, n: int = 8) -> list[str]:
    return [f"  {fmt(1e3 * s / self.calls)} ms  {kind}, {phase}: {name} {shape}"
            for s, name, kind, phase, shape in self.top[:n]]


def measure(fn: Callable[[], object], modules: dict, *, calls: int = 3) -> Profile:
  """Traces `calls` calls of `fn` (already compiled: call it once before) and sorts the thunk times by the
  instructions of `modules` (`parse_modules` of a dump, or {name: parsed} from `parse_module`).

  `fn` must return what it computed (it is waited on) or block itself.
  """
  differentiated = {name: any("jvp(" in i.op_name for i in instrs.values())
                    for name, (instrs, _) in modules.items()}
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      start, cpu_start = time.perf_counter(), os.times()
      for _ in range(calls):
        jax.block_until_ready(fn())
      wall, cpu_end = time.perf_counter() - start, os.times()
    cpu = (cpu_end.user + cpu_end.system) - (cpu_start.user + cpu_start.system)
    events = []
    for path in glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True):
      with gzip.open(path) as f:
        data = json.load(f)
      events += [e for e in data.get("traceEvents", []) if e.get("ph") == "X" and "hlo_op" in (e.get("args") or {})]
  seconds = collections.defaultdict(float)
  per_instr = collections.defaultdict(float)
  info, threads = {}, set()
  ends = _async_ends(events, modules)
  for index, e in enumerate(events):
    module, name = e["args"].get("hlo_module", ""), e["args"]["hlo_op"]
    instrs, comps = modules.get(module, ({}, {}))
    ins = instrs.get(name)
    if ins is not None and ins.op in CONTAINERS:
      continue  # its body's thunks are timed themselves
    key = (module, name)
    if key not in info:
      kind, phase = (classify(ins, comps, differentiated.get(module, True)) if ins is not None
                     else ("other", "unlabelled"))
      info[key] = (kind, phase, ins.type if ins is not None else "?")
    kind, phase, _ = info[key]
    duration = (ends[index] - e["ts"]) if index in ends else e["dur"]
    seconds[(kind, phase)] += duration * 1e-6
    per_instr[key] += duration * 1e-6
    threads.add(e.get("tid"))
  top = sorted(((s, name, *info[(m, name)]) for (m, name), s in per_instr.items()), reverse=True)
  return Profile(dict(seconds), wall, calls, top, len(threads), cpu)


def profile_rows(results: dict, args) -> None:
  """With `--profile` (`dump_dir_for`), traces each timed row that kept its step (`call`) and prints its profile."""
  if not getattr(args, "profile_dir", None):
    return
  modules = parse_modules(args.profile_dir)
  for name, row in results.items():
    if row.get("call") is not None:
      report(name, measure(row["call"], modules))


def report(title: str, profile: Profile, n_top: int = 8) -> None:
  print()
  print(f"Op profile: {title}")
  print(profile.summary())
  print()
  print(profile.table())
  print("\nlongest instructions (thunk ms per call):")
  print("\n".join(profile.top_lines(n_top)))


def add_flag(parser) -> None:
  """The benchmarks' `--profile` flag; `dump_dir_for(args)` then sets up what it needs."""
  parser.add_argument("--profile", action="store_true", help="also trace the JAX rows and print their time per op kind")


def dump_dir_for(args) -> Optional[str]:
  """Sets up the XLA dump when a benchmark runs with `--profile`; returns its directory (None without the flag)."""
  if not getattr(args, "profile", False):
    return None
  path = tempfile.mkdtemp(prefix="diffusion_jax_hlo_")
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  enable(path)
  return path
