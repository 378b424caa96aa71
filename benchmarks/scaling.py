"""Training-step scaling over devices and processes: steps/s, examples/s and achieved FLOP/s of the trainer's step.

  python -m benchmarks.scaling                              # configs/mnist_dit.py; 1, 2, 4, 8 devices; 2 processes
  python -m benchmarks.scaling --strategy fsdp              # parameters sharded over a (1, D, 1) mesh
  python -m benchmarks.scaling --config configs/mnist_dit.py:tiny --devices 1,2 --quick   # a smoke run

Every row is a fresh worker process (`JAX_PLATFORMS=cpu`, `--xla_force_host_platform_device_count=D`) that builds
the project's `Trainer` for the config with `mesh.shape` (D, 1, 1) (`--strategy data`) or (1, D, 1) (`--strategy
fsdp`), compiles `Trainer.compile_train_step` once and times it on a fixed synthetic batch of the shapes the data
pipeline yields (`diffusion_jax.plan.batch_spec`): what `python -m diffusion_jax.main` runs per step, without the
input pipeline.

Rows (one per mode, device count D and process count P):
  weak     per-device batch fixed (`--per-device-batch`), global batch D × per-device: ideally steps/s stays flat.
  strong   global batch fixed (`--global-batch`): ideally steps/s grows D-fold.
  strong with P > 1 (`--processes`, for the D of `--process-devices`)  P local JAX processes joined by
           `jax.distributed` over loopback (gloo CPU collectives, as launch/local_multiprocess.sh runs the CLI),
           D/P devices each, the strong rows' global batch, each process feeding its own rows; process 0 reports.
Columns: *GFLOP/step* is XLA's cost-analysis count of the compiled step (per device, as SPMD partitioning leaves
it) × D, so work every device repeats (the optimizer update of replicated parameters under data parallelism) is
counted each time; *GFLOP/s* is that × steps/s; *% peak* divides it by the machine's float32 matmul peak (measured
first, by this process); *speedup* is examples/s over the same mode's single-process row with the fewest devices,
and *efficiency* is speedup / (D / that row's D): 100% is linear scaling in both modes.

Read the CPU numbers for what they are. Fake devices are threads of one process sharing the machine's cores: on a
2-core machine strong scaling cannot exceed ~2× however many devices there are, and weak scaling (D times the work
per step on the same cores) shows the cost of XLA's partitioning and collectives rather than any gain; the 2-process
rows add gloo over loopback and two XLA thread pools contending for the same cores. The value of the benchmark is
that the command runs unchanged on a host with real cores to spare, and that it catches a strategy whose sharded
step does far more work (GFLOP/step) or runs far slower than the arithmetic says it should.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

from benchmarks import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGY_AXIS = {"data": "data", "fsdp": "fsdp"}  # the mesh axis a strategy spreads the D devices over
_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")


# ------------------------------------------------------------------------------------------------ worker side
def load_config(spec: str):
  """`path.py[:arg]` → the module's `get_config(arg)` (`get_config()` without an arg), as the CLI loads it."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("scaling_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def mesh_shape(axes, strategy: str, devices: int) -> tuple[int, ...]:
  """All `devices` on the strategy's mesh axis, every other axis of size 1."""
  return tuple(devices if a == STRATEGY_AXIS[strategy] else 1 for a in axes)


def synthetic_batch(config, rows: int, seed: int) -> dict[str, np.ndarray]:
  """`rows` examples of the training batch's shapes and dtypes, filled with plausible values (pixels in [-1, 1],
  labels below the config's class count, small token ids, every example valid)."""
  from diffusion_jax.plan import batch_spec
  rng = np.random.default_rng(seed)
  num_classes = int(config.get("model", {}).get("num_classes", 0) or 1)
  out = {}
  for key, spec in batch_spec(config).items():
    shape, dtype = (rows,) + tuple(spec.shape[1:]), np.dtype(spec.dtype)
    if key == "valid":
      out[key] = np.ones(shape, dtype)
    elif key == "label":
      out[key] = rng.integers(0, num_classes, shape).astype(dtype)
    elif np.issubdtype(dtype, np.integer):
      out[key] = rng.integers(1, 32, shape).astype(dtype)
    else:
      out[key] = rng.uniform(-1, 1, shape).astype(dtype)
  return out


def run_worker(job: dict) -> None:
  """One measurement inside a fresh process: join the other processes (if any), build, compile, time, report."""
  import jax
  from diffusion_jax.train import runtime
  config = load_config(job["config"]).copy_and_resolve_references()
  devices, processes = job["devices"], job["processes"]
  with config.unlocked():
    config.mesh.shape = mesh_shape(config.mesh.axes, job["strategy"], devices)
    config.sharding.strategy = job["strategy"]
    config.train.batch_size = job["global_batch"]
    if processes > 1:
      config.distributed.update(enabled=True, coordinator_address=job["coordinator"], num_processes=processes,
                                process_id=job["process_id"], local_device_count=devices // processes)
  runtime.initialize_distributed(config)
  if jax.device_count() != devices or jax.process_count() != processes:
    raise RuntimeError(f"expected {devices} devices in {processes} processes, JAX has {jax.device_count()} in "
                       f"{jax.process_count()}")
  rows = job["global_batch"] // processes
  host = synthetic_batch(config, rows, seed=jax.process_index())
  result = common.time_sharded_step(config, host, types.SimpleNamespace(**job))
  del result["call"]  # the step itself: only the numbers go back to the parent
  result.update(devices=jax.device_count(), processes=jax.process_count(), global_batch=job["global_batch"],
                platform=jax.devices()[0].platform)
  if jax.process_index() == 0:
    with open(job["result_path"], "w") as f:
      json.dump(result, f)


# ------------------------------------------------------------------------------------------------ parent side
def _children_cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _worker_env(local_devices: int, processes: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH", "")]))
  flags = _DEVICE_FLAG.sub("", env.get("XLA_FLAGS", "")).split()
  if processes == 1:  # multi-process workers get their devices from jax_num_cpu_devices (distributed config)
    flags.append(f"--xla_force_host_platform_device_count={local_devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def _tail(path: str, n: int = 3000) -> str:
  with open(path, errors="replace") as f:
    return f.read()[-n:]


def run_job(job: dict, tmp: str, timeout: float) -> dict:
  """Runs one measurement as `job['processes']` worker processes; returns process 0's result."""
  key = f"d{job['devices']}_p{job['processes']}_b{job['global_batch']}"
  processes = job["processes"]
  job = dict(job, result_path=os.path.join(tmp, key + ".json"),
             coordinator=f"127.0.0.1:{_free_port()}" if processes > 1 else "")
  procs, logs = [], []
  try:
    for i in range(processes):
      logs.append(os.path.join(tmp, f"{key}_process_{i}.log"))
      with open(logs[-1], "w") as log:
        cmd = [sys.executable, "-m", "benchmarks.scaling", "--worker", json.dumps(dict(job, process_id=i))]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=_worker_env(job["devices"] // processes, processes),
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    waited, last = 0.0, time.monotonic()
    while any(p.poll() is None for p in procs):
      # Count at most 1 s per pass: time this script spent stopped (SIGSTOP, a suspended machine) is not the
      # workers' fault.
      now = time.monotonic()
      waited, last = waited + min(now - last, 1.0), now
      failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
      if failed or waited > timeout:
        i = failed[0] if failed else 0
        what = f"process {i} exited with {procs[i].returncode}" if failed else f"timed out ({timeout:.0f}s)"
        raise SystemExit(f"error: worker {key}: {what}; log of process {i}:\n{_tail(logs[i])}")
      time.sleep(0.2)
    for i, p in enumerate(procs):
      if p.returncode != 0:
        raise SystemExit(f"error: worker {key}: process {i} exited with {p.returncode}; its log:\n{_tail(logs[i])}")
  finally:
    for p in procs:  # only the workers started here, each in its own session
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  with open(job["result_path"]) as f:
    return json.load(f)


def plan_rows(args) -> list[tuple[str, int, int, int]]:
  """(mode, devices, processes, global batch) of every row, in print order."""
  rows = [("weak", d, 1, d * args.per_device_batch) for d in args.devices]
  rows += [("strong", d, 1, args.global_batch) for d in args.devices]
  if args.processes > 1:
    chosen = args.process_devices or [d for d in args.devices if d % args.processes == 0]
    for d in chosen:
      if d % args.processes:
        raise SystemExit(f"error: {d} devices cannot be split evenly over {args.processes} processes")
    rows += [("strong", d, args.processes, args.global_batch) for d in chosen]
  for mode, d, p, batch in rows:
    if batch % d:
      raise SystemExit(f"error: the {mode} row with {d} devices has global batch {batch}, which {d} devices cannot "
                       "split evenly; pick --global-batch divisible by every device count")
  return rows


def table_rows(rows, results: dict, peak: float) -> list[list]:
  out = []
  for mode, d, p, batch in rows:
    r = results[(d, p, batch)]
    base_row = min((x for x in rows if x[0] == mode and x[2] == 1), key=lambda x: x[1])
    base = results[(base_row[1], 1, base_row[3])]
    timed = dict(seconds=r["seconds"], flops=r["flops"], params=r["params"])
    # [name, params, steps/s, examples/s, GFLOP/step, GFLOP/s, % peak, vs]: keep the middle five.
    cells = common.throughput_rows({mode: timed}, baseline="", batch=batch, peak=peak, default_flops=0.0)[0][2:7]
    speedup = (batch / r["seconds"]) / (base_row[3] / base["seconds"])
    out.append([mode, d, p, batch, *cells, common.fmt(speedup) + "×",
                f"{100 * speedup / (d / base_row[1]):.0f}%", f"{r['compile_seconds']:.1f}"])
  return out


def _int_list(text: str) -> list[int]:
  values = [int(v) for v in text.split(",") if v.strip()]
  if not values or any(v < 1 for v in values):
    raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
  return sorted(set(values))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/mnist_dit.py", help="a config file, optionally `path.py:arg`")
  parser.add_argument("--devices", type=_int_list, default=[1, 2, 4, 8], help="device counts, e.g. 1,2,4,8")
  parser.add_argument("--per-device-batch", type=int, default=8, help="weak scaling: examples per device")
  parser.add_argument("--global-batch", type=int, default=64, help="strong scaling: examples per step")
  parser.add_argument("--processes", type=int, default=2,
                      help="also run the strong rows as this many local JAX processes (1: single process only)")
  parser.add_argument("--process-devices", type=_int_list, default=None,
                      help="total device counts of the multi-process rows (default: each of --devices that "
                      "--processes divides)")
  parser.add_argument("--strategy", choices=tuple(STRATEGY_AXIS), default="data",
                      help="data: mesh (D, 1, 1), parameters replicated; fsdp: mesh (1, D, 1), parameters sharded")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per window")
  parser.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per row's workers")
  parser.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up, 1 window of --steps, small peak")
  parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: a JSON job, run inside a worker process
  args = parser.parse_args(argv)
  if args.worker:
    return run_worker(json.loads(args.worker))

  watch = common.OtherCpuUse()
  t_start = time.monotonic()
  if args.quick:
    args.repeats, args.warmup = 1, 1
  rows = plan_rows(args)
  config_path, _, config_arg = args.config.partition(":")
  config_spec = os.path.abspath(config_path) + (":" + config_arg if config_arg else "")

  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  n = 256 if args.quick else 2048
  peak, peak_line = common.peak_summary(
      common.measure_matmul_peak(n, with_torch=importlib.util.find_spec("torch") is not None), n)

  results = {}
  jobs = list(dict.fromkeys((d, p, batch) for _, d, p, batch in rows))  # a weak and a strong row may coincide
  with tempfile.TemporaryDirectory(prefix="scaling_") as tmp:
    for i, (d, p, batch) in enumerate(jobs):
      t0, cpu0 = time.monotonic(), _children_cpu_seconds()
      job = dict(config=config_spec, strategy=args.strategy, devices=d, processes=p, global_batch=batch,
                 steps=args.steps, repeats=args.repeats, warmup=args.warmup)
      results[(d, p, batch)] = run_job(job, tmp, args.timeout)
      print(f"[{i + 1}/{len(jobs)}] {d} device(s), {p} process(es), global batch {batch}: "
            f"{results[(d, p, batch)]['seconds'] * 1e3:.1f} ms/step ({time.monotonic() - t0:.0f}s wall, "
            f"{_children_cpu_seconds() - cpu0:.0f} CPU-s)",
            file=sys.stderr, flush=True)

  first = results[jobs[0]]
  common.print_report(
      [f"Training-step scaling, {args.config}, strategy {args.strategy!r}, median of {args.repeats} windows of "
       f"{args.steps} steps; weak: {args.per_device_batch} examples per device, strong: global batch "
       f"{args.global_batch}",
       f"{first['params']:,} parameters; fake CPU devices (XLA host platform) sharing {os.cpu_count()} cores; "
       f"{time.monotonic() - t_start:.0f}s wall in all"],
      watch, common.markdown_table(
          ["mode", "devices", "processes", "global batch", "steps/s", "examples/s", "GFLOP/step", "GFLOP/s", "% peak",
           "speedup", "efficiency", "compile s"], table_rows(rows, results, peak), align="lrrrrrrrrrrr"),
      notes=[peak_line])


if __name__ == "__main__":
  common.run(main)
