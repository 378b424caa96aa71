"""What every benchmark shares: a timing loop, the machine's matmul peak, XLA's FLOP count, a markdown table.

Numbers are medians over several timed windows, each started after warm-up, because a shared 2-core machine
has outliers (another process waking up) that a mean would fold in.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from diffusion_jax.train.compile_report import compiled_flops  # noqa: F401  (re-exported for the scripts)

DEFAULT_TORCH_THREADS = 2


def setup_torch(threads: int = DEFAULT_TORCH_THREADS):
  """Imports torch with a fixed intra-op thread count (one per core here), so its rows are reproducible."""
  import torch
  torch.set_num_threads(threads)
  return torch


def time_per_call(fn: Callable[[], object], *, warmup: int = 2, iters: int = 5, repeats: int = 5,
                  sync: Optional[Callable[[object], object]] = jax.block_until_ready) -> tuple[float, list[float]]:
  """Median seconds per `fn()` call over `repeats` windows of `iters` back-to-back calls.

  Only the last output of a window is waited on, so JAX's asynchronous dispatch overlaps Python with compute as
  it would in a real loop; `fn` must therefore chain its calls (e.g. feed each step's state into the next) or the
  window would end before earlier calls finished. Pass `sync=None` for synchronous frameworks (PyTorch on CPU).
  Returns (median, every window's per-call time).
  """
  sync = sync or (lambda x: x)
  out = None
  for _ in range(warmup):
    out = fn()
  sync(out)
  samples = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = fn()
    sync(out)
    samples.append((time.perf_counter() - t0) / iters)
  return statistics.median(samples), samples


def measure_matmul_peak(n: int = 2048, *, repeats: int = 9, torch_threads: int = DEFAULT_TORCH_THREADS,
                        with_torch: bool = True) -> dict[str, float]:
  """float32 GFLOP/s of an n×n @ n×n product in JAX (jitted jnp.dot) and PyTorch (torch.matmul).

  The ceiling a dense float32 workload can reach on this machine; the benchmarks report achieved GFLOP/s as a
  fraction of it.
  """
  flops = 2.0 * n ** 3
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  # One product per window: independent calls may run concurrently under async dispatch, and the last one can
  # finish first, so a window of several would under-count.
  seconds, _ = time_per_call(lambda: dot(a, b), warmup=2, iters=1, repeats=repeats)
  out = {"jax": flops / seconds / 1e9}
  if with_torch:
    torch = setup_torch(torch_threads)
    ta, tb = torch.from_numpy(np.array(a)), torch.from_numpy(np.array(b))  # copies: writable
    seconds, _ = time_per_call(lambda: torch.matmul(ta, tb), warmup=2, iters=1, repeats=repeats, sync=None)
    out["torch"] = flops / seconds / 1e9
  return out


def peak_summary(peak: dict[str, float], n: int = 2048) -> tuple[float, str]:
  """(the machine's float32 peak, a line saying how it was measured).

  The peak is the faster framework's matmul: what the cores demonstrably sustain. The two can differ by 2× (MKL's
  sgemm, which PyTorch uses, takes AVX2 code paths on AMD CPUs where XLA uses AVX-512), and dividing each row by its
  own framework's ceiling would hide that.
  """
  best = max(peak.values())
  parts = ", ".join(f"{k} {fmt(v)}" for k, v in peak.items())
  return best, f"matmul peak (float32 {n}×{n} @ {n}×{n}, GFLOP/s): {parts}; '% peak' is of {fmt(best)}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: Optional[str] = None) -> str:
  """A GitHub markdown table; `align` has one of 'l'/'r' per column (default: first left, rest right)."""
  align = align or "l" + "r" * (len(headers) - 1)
  if len(align) != len(headers) or any(len(r) != len(headers) for r in rows):
    raise ValueError("every row and the alignment need one entry per header")
  cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

  def line(row):
    return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)) + " |"

  rule = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else (":" + "-" * (w + 1)) for w, a in zip(widths, align)) + "|"
  return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


class OtherCpuUse:
  """How busy the machine's other processes kept the CPU while this one ran, from /proc/stat (Linux only).

  A benchmark on a shared 2-core machine is only worth pasting if this stays near 0; the scripts print it with
  their tables.
  """

  def __init__(self):
    self._start = self._snapshot()

  @staticmethod
  def _snapshot():
    try:
      with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
      return None
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle and iowait
    t = os.times()  # this process and its finished children (a benchmark's worker processes) are not "others"
    return (busy / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system,
            time.perf_counter())

  def fraction(self) -> Optional[float]:
    """Other processes' CPU seconds per wall second per core since construction, in [0, 1]."""
    end = self._snapshot()
    if self._start is None or end is None:
      return None
    busy, own, wall = (e - s for e, s in zip(end, self._start))
    return max(busy - own, 0.0) / max(wall, 1e-9) / (os.cpu_count() or 1)

  def line(self) -> str:
    f = self.fraction()
    return "other processes' CPU use during the run: " + ("unknown" if f is None else f"{100 * f:.0f}% of the cores")


def run(main: Callable[[], None]) -> None:
  """A benchmark's entry point: with tcmalloc preloaded, as `python -m diffusion_jax.main` runs (both rows of a
  table share the process, so both get it; diffusion_jax/allocator.py, DIFFUSION_JAX_TCMALLOC=0 turns it off)."""
  from diffusion_jax import allocator
  allocator.reexec_with_tcmalloc()
  main()


def environment_line() -> str:
  """Date, versions and machine load, printed above every table so a pasted result says where it came from."""
  from diffusion_jax import allocator, xla_cpu
  parts = [datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           f"{os.cpu_count()} CPU cores ({platform.machine()})", f"jax {jax.__version__}",
           f"backend {jax.default_backend()}", f"allocator {allocator.in_use()}",
           f"CPU convolutions {xla_cpu.in_use()}"]
  try:
    import torch
    parts.append(f"torch {torch.__version__}")
  except ImportError:
    pass
  try:
    import diffusers
    parts.append(f"diffusers {diffusers.__version__}")
  except ImportError:
    pass
  if hasattr(os, "getloadavg"):
    parts.append("load avg %.2f" % os.getloadavg()[0])
  return ", ".join(parts)


def fmt(x: float, digits: int = 3) -> str:
  """`digits` significant figures without scientific notation for the sizes these tables hold."""
  if x == 0 or not np.isfinite(x):
    return str(x)
  decimals = max(digits - 1 - int(np.floor(np.log10(abs(x)))), 0)
  return f"{x:.{decimals}f}"


def time_trainer_step(config, host_batch: dict, args) -> dict:
  """Seconds per step of `Trainer.compile_train_step` for `config` at the batch of `host_batch` (one device).

  What `python -m diffusion_jax.main` runs per step, on fixed inputs: `args` gives warmup / steps / repeats.
  """
  config = config.copy_and_resolve_references()
  config.unlock()
  config.train.batch_size = len(next(iter(host_batch.values())))
  config.mesh.shape = (1, 1, 1)
  config.lock()
  return time_sharded_step(config, host_batch, args)


def time_sharded_step(config, host_batch: dict, args) -> dict:
  """`time_trainer_step` on the config's own mesh and global batch size; `host_batch` holds this process's rows.

  `flops` is the whole step's (every device), `compile_seconds` the ahead-of-time compile.
  """
  import tempfile
  from diffusion_jax.train.trainer import Trainer
  with tempfile.TemporaryDirectory() as workdir:
    trainer = Trainer(config, workdir)
    batch = trainer.to_global(host_batch)
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in batch.items()}
    t0 = time.perf_counter()
    compiled = trainer.compile_train_step(spec)
    compile_seconds = time.perf_counter() - t0
    state = [trainer.init_state()]
    frozen = trainer.init_frozen()

    def step():
      state[0], _ = compiled(state[0], frozen, batch)
      return state[0]

    seconds, samples = time_per_call(step, warmup=args.warmup, iters=args.steps, repeats=args.repeats)
    return dict(seconds=seconds, windows=samples, flops=trainer.step_flops, compile_seconds=compile_seconds,
                call=step,
                mesh=dict(trainer.mesh.shape),
                params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state[0].params)))


def time_adamw_step(loss_fn: Callable, params, batch: dict, args, *, lr: float) -> dict:
  """The JAX row of a training benchmark: `loss_fn(params, batch)`, its gradient and a plain AdamW update (no clipping,
  no weight decay, what the PyTorch rows run) in one jitted program with donated state, timed with `args`' warmup /
  steps / repeats. Returns seconds per step, XLA's FLOP count of the step and the parameter count."""
  import optax
  tx = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}

  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  state = [params, tx.init(params)]
  compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(state[0], state[1], batch).compile()

  def step():
    state[0], state[1], _ = compiled(state[0], state[1], batch)
    return state

  seconds, _ = time_per_call(step, warmup=args.warmup, iters=args.steps, repeats=args.repeats)
  return dict(seconds=seconds, flops=compiled_flops(compiled), params=n_params, call=step)


def print_report(title: Sequence[str], watch, table: str, *, notes: Sequence[str] = ()) -> None:
  """A benchmark's printout: what was run (`title` lines), where and under what load (the environment line and
  `watch`, an `OtherCpuUse`), `notes` such as the matmul peak, then the markdown table."""
  print()
  for line in (*title, environment_line(), watch.line(), *notes):
    print(line)
  print()
  print(table)


def throughput_rows(results: dict, *, baseline: str, batch: int, peak: float, default_flops: float) -> list[list]:
  """Table rows [name, params, steps/s, images/s, GFLOP/step, GFLOP/s, % peak, vs baseline] of timed results.

  A result without its own FLOP count (a PyTorch row) is credited with `default_flops`, so its GFLOP/s ratio
  equals its images/s ratio.
  """
  base = results.get(baseline, {}).get("seconds")
  rows = []
  for name, r in results.items():
    flops = r.get("flops", default_flops)
    steps_per_sec = 1.0 / r["seconds"]
    gflops = flops * steps_per_sec / 1e9
    rows.append([name, f"{r['params']:,}", fmt(steps_per_sec), fmt(steps_per_sec * batch), fmt(flops / 1e9),
                 fmt(gflops), f"{100 * gflops / peak:.1f}%", fmt(base / r["seconds"]) + "×" if base else "-"])
  return rows
