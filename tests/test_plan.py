"""The memory planner (`python -m diffusion_jax.plan`): per-device bytes of a hypothetical mesh without allocating,
XLA's compiled estimate when the mesh can be compiled on fake devices, communication per step (counted in the
compiled step and estimated from the shardings), one-line errors."""
import os
import re
import subprocess
import sys

import pytest

from configs.mnist_dit import get_config
from diffusion_jax import plan
from diffusion_jax.parallel import communication
from tests.conftest import FAST_COMPILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# How far the traffic of the collectives counted in a compiled step may be from the analytic estimate (either
# way). Measured on the tiny DiT: 1.00 under 'data' (8 devices), 1.10 under 'fsdp' on data=2,fsdp=4 and 0.98 on
# fsdp=8. XLA:CPU reduces some FSDP gradients with an all-reduce where the estimate has a reduce-scatter, gathers
# a few activations and all-reduces the scalar metrics; a broken count (none found, or every collective counted
# twice) falls outside.
FACTOR = 1.3
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def run_plan(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
  return subprocess.run([sys.executable, "-m", "diffusion_jax.plan", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _bytes(text):
  number, unit = text.split()
  return float(number) * _UNITS[unit]


def _row(report, what):
  """(total, per device) bytes of a row of the report's table."""
  m = re.search(rf"^  {what}\s+([\d.]+ \w+)\s+([\d.]+ \w+)$", report, re.M)
  assert m, report
  return _bytes(m.group(1)), _bytes(m.group(2))


def test_planner_prints_fsdp_bytes_and_the_compiled_step():
  proc = run_plan("--config", "configs/mnist_dit.py:tiny", "--mesh", "data=2,fsdp=4", "--config.sharding.strategy=fsdp")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "mesh data=2 fsdp=4 tensor=1 (8 devices), sharding.strategy='fsdp', global batch 8" in out
  for what in ("parameters", "optimizer state", "EMA parameters"):
    total, per_device = _row(out, what)
    assert total / 4 <= per_device <= 1.2 * total / 4, what  # split over fsdp=4, replicated over data=2
  params, _ = _row(out, "parameters")
  assert _row(out, "optimizer state")[0] == pytest.approx(2 * params, rel=1e-3)  # Adam's two moments
  state, batch = _row(out, "train state")[1], _row(out, "batch")[1]
  arguments = _bytes(re.search(r"arguments ([\d.]+ \w+),", out).group(1))
  assert arguments == pytest.approx(state + batch, rel=0.02)  # XLA sees the same shards the table reports
  assert re.search(r"temporaries [\d.]+ \w+ \(activations", out) and "FLOPs per step" in out
  # Communication: FSDP gathers parameters and reduce-scatters gradients over fsdp=4, all-reduces the gradient
  # shards over data=2; the collectives XLA put in the compiled step move about as many bytes.
  for what in ("parameter all-gather over fsdp \\(4\\)", "gradient reduce-scatter over fsdp \\(4\\)",
               "gradient all-reduce over data \\(2\\)"):
    assert re.search(rf"^    {what}\s+[\d.]+ \w+$", out, re.M), (what, out)
  compiled = _bytes(re.search(r"^    total\s+([\d.]+ \w+)  \(compiled / analytic", out, re.M).group(1))
  ratio = float(re.search(r"compiled / analytic = ([\d.]+)", out).group(1))
  assert compiled > 0 and 1 / FACTOR < ratio < FACTOR, out
  assert re.search(r"^    all-gather\s+[1-9]", out, re.M), out  # FSDP without a gather would not be FSDP


def test_planner_sizes_a_mesh_without_compiling_and_warns_of_replicated_parameters():
  # 1024-way FSDP: dimensions of 32 or 256 cannot be split that far; the 256×32 time-embedding kernel stays whole.
  proc = run_plan("--config", "configs/mnist_dit.py:tiny", "--mesh", "fsdp=1024", "--nocompile",
                  "--config.sharding.strategy=fsdp", "--config.sharding.min_sharded_size=8000",
                  "--config.train.batch_size=1024")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "(1024 devices)" in out and "not compiled (--nocompile)" in out and "analytic" in out
  assert re.search(r"WARNING: 1 parameter\(s\) of >= 8,000 elements stay replicated", out), out
  assert "dit.emb.timestep_embedder.linear_1.kernel (256, 32)" in out


def test_a_bad_mesh_is_one_line_and_exit_code_2():
  proc = run_plan("--config", "configs/mnist_dit.py:tiny", "--mesh", "data=2,model=4", "--nocompile")
  assert proc.returncode == 2
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "'model=4'" in errors[0], proc.stderr[-2000:]


def test_a_mesh_larger_than_the_process_is_planned_analytically():
  config = get_config("tiny")
  config.mesh.shape = (1, 16, 1)
  config.sharding.strategy = "fsdp"
  config.train.batch_size = 16
  p = plan.make_plan(config)  # this test process has 8 devices
  assert p.compiled is None and "fewer than the mesh's 16" in p.compile_note
  total, per_device = p.row("parameters")
  assert total / 16 <= per_device <= 1.2 * total / 16
  # Analytic communication: gather once (XLA keeps the gathered copy for the backward pass without remat) and
  # reduce-scatter the gradients once, each (15/16)·P.
  params = total  # float32 bytes of every parameter
  assert p.traffic == pytest.approx(2 * 15 / 16 * params, rel=0.02)
  config.model.remat = "full"  # the backward pass gathers again inside each rematerialised block
  assert plan.make_plan(config).traffic == pytest.approx(3 * 15 / 16 * params, rel=0.02)


def test_frozen_parameters_are_gathered_but_have_no_gradient_to_reduce():
  config = get_config("tiny")
  config.mesh.shape = (1, 16, 1)
  config.sharding.strategy = "fsdp"
  config.sharding.min_sharded_size = 0
  config.train.batch_size = 16
  config.train.frozen = (r".*transformer_blocks\.0\.",)
  p = plan.make_plan(config, compile=False)
  trainable, frozen = p.row("parameters")[0], p.row("frozen parameters")[0]
  assert frozen > 0 and p.row("optimizer state")[0] == pytest.approx(2 * trainable, rel=0.01)
  traffic = {t.what: t.traffic for t in p.transfers}
  assert traffic["frozen parameter all-gather"] == pytest.approx(15 / 16 * frozen, rel=0.02)
  assert traffic["gradient reduce-scatter"] == pytest.approx(15 / 16 * trainable, rel=0.02)
  assert traffic["parameter all-gather"] == pytest.approx(15 / 16 * trainable, rel=0.02)


def test_data_parallel_communication_is_one_gradient_all_reduce():
  config = get_config("tiny")
  config.mesh.shape = (8, 1, 1)
  p = plan.make_plan(config)  # compiles on this process's 8 fake devices
  params = p.row("parameters")[0]
  assert [(t.what, t.axes) for t in p.transfers] == [("gradient all-reduce", ("data",))]
  assert p.traffic == pytest.approx(2 * 7 / 8 * params)
  assert p.collectives["all-reduce"].count >= 1 and "all-gather" not in p.collectives
  assert 1 / FACTOR < p.compiled_traffic / p.traffic < FACTOR, p.collectives


def test_hlo_collectives_are_counted_by_result_bytes_and_ring_traffic():
  hlo = """
  %all-reduce.1 = f32[256]{0} all-reduce(f32[256]{0} %p), channel_id=1, replica_groups=[1,8]<=[8], to_apply=%add
  %ag-start = (f32[2,8]{1,0}, f32[8,8]{1,0}) all-gather-start(f32[2,8]{1,0} %q), replica_groups={{0,1,2,3},{4,5,6,7}}
  %ag-done = f32[8,8]{1,0} all-gather-done((f32[2,8]{1,0}, f32[8,8]{1,0}) %ag-start)
  ROOT %rs = (bf16[4]{0}, f32[4]{0}) reduce-scatter(bf16[16]{0} %a, f32[16]{0} %b), replica_groups={{0,1,2,3}}
  %fusion = f32[8]{0} fusion(f32[8]{0} %all-reduce.1), kind=kLoop
"""
  found = communication.compiled_collectives(hlo, num_devices=8)
  assert found["all-reduce"].count == 1 and found["all-reduce"].traffic == pytest.approx(2 * 7 / 8 * 1024)
  assert found["all-gather"].count == 1 and found["all-gather"].result_bytes == 256  # counted at -done only
  assert found["all-gather"].traffic == pytest.approx(3 / 4 * 256)
  assert found["reduce-scatter"].result_bytes == 24 and found["reduce-scatter"].traffic == 3 * 24


def test_chip_estimate_turns_bytes_into_time():
  config = get_config("tiny")
  config.mesh.shape = (2, 2, 4)
  config.sharding.strategy = "tensor"
  p = plan.make_plan(config, compile=False, count_flops=True)
  assert p.flops > 0
  whats = {t.what: t for t in p.transfers}
  assert set(whats) == {"gradient all-reduce", "activation all-reduce (forward + backward)"}
  # Attention and MLP outputs of 2 tiny DiT blocks, 16 tokens of width 32 in float32, for the 2 images of a
  # data×fsdp shard; all-reduced over tensor=4 (ring: 2·3/4 of the size) in the forward and the backward pass.
  size = (2 * 2) * 16 * 32 * 4 * 2
  assert whats["activation all-reduce (forward + backward)"].traffic == pytest.approx(2 * (2 * 3 / 4) * size)
  chip = communication.CHIPS["h100"]  # 16 devices: the data axis crosses nodes of 8, fsdp×tensor does not
  assert communication.crosses_nodes(("data",), p.mesh, 8) and not communication.crosses_nodes(("fsdp",), p.mesh, 8)
  row = plan.format_row(p, chip, 0.5)
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[:2] == ["tensor", "data=2,fsdp=2,tensor=4"]
  comm_ms = sum(communication.seconds(t, chip, p.mesh) for t in p.transfers) * 1e3
  assert cells[6] == cells[8] == "-"  # not compiled
  assert float(cells[9]) == pytest.approx(comm_ms, rel=0.01)
  assert float(cells[10]) == pytest.approx(p.flops / (989e12 * 0.5) * 1e3, rel=0.01)
