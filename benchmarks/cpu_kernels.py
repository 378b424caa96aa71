"""The CPU kernels written for issue 22, each against what it replaced and against PyTorch, in isolation.

  python -m benchmarks.cpu_kernels            # the README rows
  python -m benchmarks.cpu_kernels --quick    # a smoke run

Rows (float32, median ms per call, same random inputs on both sides):
  attention     `models.attention.host_attention` (the CPU default) against `jax.nn.dot_product_attention`
                (implementation 'xla') and torch's `scaled_dot_product_attention`, at the SD-shaped benchmark's
                latent levels (batch 8 = 4 prompts with guidance, 8-wide heads) and the default U-Net's 7×7 level.
  group norm    `layers.GroupNorm` + SiLU against `nnx.GroupNorm` + SiLU and torch's `group_norm` + `silu`:
                forward, and forward + backward of sum(sin(.)).
  1×1 conv      `layers.Conv` with a 1×1 kernel (a matmul) against `nnx.Conv` and torch's `conv2d`, forward +
                backward of sum(sin(.)).
  3×3 conv      the default U-Net's 3×3 convolutions (batch 64): forward, input gradient and kernel gradient
                (`jax.vjp` with a fixed cotangent) on Eigen, as `diffusion_jax/xla_cpu.py` sets XLA up, against
                XLA's default YNNPACK convolutions (timed in a subprocess started with DIFFUSION_JAX_EIGEN_CONV=0:
                XLA reads its flags once per process) and torch's `conv2d` / `convolution_backward`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import common

ATTENTION = [(8, 1024, 1024, 8, 8), (8, 256, 256, 16, 8), (8, 1024, 77, 8, 8), (64, 49, 49, 4, 16)]
GROUP_NORM = [(64, 28, 16, 8), (64, 28, 32, 8), (64, 14, 64, 8), (64, 7, 64, 8), (8, 32, 128, 32)]
POINTWISE = [(64, 28, 48, 32), (64, 14, 96, 32), (8, 32, 128, 64)]
CONV3 = [(64, 28, 16, 16), (64, 28, 32, 16), (64, 28, 48, 16), (64, 28, 32, 32), (64, 14, 32, 32), (64, 14, 48, 32),
         (64, 14, 96, 32), (64, 14, 64, 64), (64, 7, 64, 64), (64, 7, 96, 64), (64, 7, 128, 64)]


def _ms(fn, args, sync=jax.block_until_ready):
  return 1e3 * common.time_per_call(fn, warmup=2, iters=args.iters, repeats=args.repeats, sync=sync)[0]


def _torch(torch, a: np.ndarray, axes=(0, 3, 1, 2)):
  """`a` as a contiguous torch tensor with its axes in `axes` order (default: NHWC images as NCHW)."""
  return torch.from_numpy(np.ascontiguousarray(a.transpose(*axes)))


def _grad_of_sum_sin(f):
  return jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1)))


def attention_rows(args, torch):
  from diffusion_jax.models.attention import host_attention
  rows = []
  for b, t, s, n, h in ATTENTION[:1] if args.quick else ATTENTION:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, t, n, h), np.float32)
    k, v = (rng.standard_normal((b, s, n, h), np.float32) for _ in range(2))
    ours, xla = jax.jit(host_attention), jax.jit(lambda *a: jax.nn.dot_product_attention(*a, implementation="xla"))
    err = float(np.abs(np.asarray(ours(q, k, v)) - np.asarray(xla(q, k, v))).max())
    tq, tk, tv = (_torch(torch, x, (0, 2, 1, 3)) for x in (q, k, v))
    with torch.inference_mode():
      t_torch = _ms(lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv), args, sync=None)
    rows.append([f"attention B{b} T{t} S{s} {n}×{h}", common.fmt(_ms(lambda: ours(q, k, v), args)),
                 common.fmt(_ms(lambda: xla(q, k, v), args)), common.fmt(t_torch), f"{err:.1e}"])
  return rows


def group_norm_rows(args, torch):
  from diffusion_jax.models import layers
  rows = []
  for b, hw, c, g in GROUP_NORM[:1] if args.quick else GROUP_NORM:
    norm = layers.group_norm(c, g, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(norm)
    x = np.random.default_rng(0).standard_normal((b, hw, hw, c)).astype(np.float32) * 2 + 1
    ours = lambda p, x: jax.nn.silu(nnx.merge(graphdef, p)(x))
    theirs = lambda p, x: jax.nn.silu(nnx.GroupNorm.__call__(nnx.merge(graphdef, p), x))
    tx = _torch(torch, x).requires_grad_()
    tw, tb = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)

    def torch_step(backward):
      out = torch.nn.functional.silu(torch.nn.functional.group_norm(tx, g, tw, tb, 1e-5))
      if backward:
        torch.sin(out).sum().backward()
      return out

    cells = []
    for backward in (False, True):
      f_ours = _grad_of_sum_sin(ours) if backward else jax.jit(ours)
      f_theirs = _grad_of_sum_sin(theirs) if backward else jax.jit(theirs)
      cells += [common.fmt(_ms(lambda: f_ours(params, x), args)), common.fmt(_ms(lambda: f_theirs(params, x), args))]
      if backward:
        cells.append(common.fmt(_ms(lambda: torch_step(True), args, sync=None)))
      else:
        with torch.no_grad():
          cells.append(common.fmt(_ms(lambda: torch_step(False), args, sync=None)))
    rows.append([f"group norm + SiLU B{b} {hw}×{hw}×{c}, {g} groups", *cells])
  return rows


def pointwise_rows(args, torch):
  from diffusion_jax.models import layers
  rows = []
  for b, hw, c, o in POINTWISE[:1] if args.quick else POINTWISE:
    conv = layers.conv(c, o, 1, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(conv)
    x = np.random.default_rng(0).standard_normal((b, hw, hw, c)).astype(np.float32)
    f_ours = _grad_of_sum_sin(lambda p, x: nnx.merge(graphdef, p)(x))
    f_theirs = _grad_of_sum_sin(lambda p, x: nnx.Conv.__call__(nnx.merge(graphdef, p), x))
    tx = _torch(torch, x).requires_grad_()
    tw = torch.zeros(o, c, 1, 1, requires_grad=True)
    tb = torch.zeros(o, requires_grad=True)

    def torch_step():
      out = torch.nn.functional.conv2d(tx, tw, tb)
      torch.sin(out).sum().backward()
      return out

    rows.append([f"1×1 conv B{b} {hw}×{hw} {c}→{o}, fwd + bwd", common.fmt(_ms(lambda: f_ours(params, x), args)),
                 common.fmt(_ms(lambda: f_theirs(params, x), args)), common.fmt(_ms(torch_step, args, sync=None))])
  return rows


def _conv3_inputs(b, hw, c, o):
  rng = np.random.default_rng(0)
  return (rng.standard_normal((b, hw, hw, c), np.float32), rng.standard_normal((3, 3, c, o), np.float32) * 0.1,
          rng.standard_normal((b, hw, hw, o), np.float32))


def conv3_jax_ms(args) -> list[list[float]]:
  """[forward, input-grad, kernel-grad] ms of each `CONV3` shape, with this process's XLA flags."""
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  forward = jax.jit(conv)
  input_grad = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
  kernel_grad = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
  out = []
  for shape in CONV3[:1] if args.quick else CONV3:
    x, w, g = _conv3_inputs(*shape)
    out.append([_ms(lambda: forward(x, w), args), _ms(lambda: input_grad(x, w, g), args),
                _ms(lambda: kernel_grad(x, w, g), args)])
  return out


def _conv3_ynnpack_ms(args) -> list[list[float]]:
  from diffusion_jax import xla_cpu
  env = dict(os.environ, **{xla_cpu.SWITCH: "0"})
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(xla_cpu.FLAG, "").strip()
  argv = [sys.executable, "-m", "benchmarks.cpu_kernels", "--conv3-json", "--iters", str(args.iters),
          "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return json.loads(subprocess.run(argv, env=env, cwd=root, check=True, capture_output=True, text=True).stdout)


def conv3_rows(args, torch):
  ours, ynn = conv3_jax_ms(args), _conv3_ynnpack_ms(args)
  rows, totals = [], np.zeros(9)
  for shape, eigen_ms, ynn_ms in zip(CONV3, ours, ynn):
    x, w, g = _conv3_inputs(*shape)
    x, w, g = _torch(torch, x), _torch(torch, w, (3, 2, 0, 1)), _torch(torch, g)
    backward = lambda mask: torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [1, 1], [1, 1], False,
                                                                [0, 0], 1, mask)
    with torch.no_grad():
      torch_ms = [_ms(lambda: torch.nn.functional.conv2d(x, w, padding=1), args, sync=None),
                  _ms(lambda: backward([True, False, False]), args, sync=None),
                  _ms(lambda: backward([False, True, False]), args, sync=None)]
    cells = np.array(eigen_ms + ynn_ms + torch_ms)
    totals += cells
    b, hw, c, o = shape
    rows.append([f"B{b} {hw}×{hw} {c}→{o}"] + [common.fmt(v) for v in cells])
  rows.append(["**sum**"] + [common.fmt(v) for v in totals])
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--iters", type=int, default=5, help="calls per timed window")
  parser.add_argument("--repeats", type=int, default=5, help="timed windows; the median is reported")
  parser.add_argument("--torch-threads", type=int, default=common.DEFAULT_TORCH_THREADS)
  parser.add_argument("--quick", action="store_true", help="smoke run: one shape per kernel, 1 window of 1 call")
  parser.add_argument("--conv3-json", action="store_true", help=argparse.SUPPRESS)  # the YNNPACK subprocess
  args = parser.parse_args(argv)
  if args.quick:
    args.iters, args.repeats = 1, 1
  if args.conv3_json:
    return print(json.dumps(conv3_jax_ms(args)))
  watch = common.OtherCpuUse()
  torch = common.setup_torch(args.torch_threads)
  tables = [
      common.markdown_table(["attention", "ours ms", "jax 'xla' ms", "torch sdpa ms", "max |ours - jax|"],
                            attention_rows(args, torch)),
      common.markdown_table(["group norm", "ours fwd", "nnx fwd", "torch fwd", "ours fwd+bwd", "nnx fwd+bwd",
                             "torch fwd+bwd"], group_norm_rows(args, torch)),
      common.markdown_table(["1×1 conv", "ours ms", "nnx.Conv ms", "torch ms"], pointwise_rows(args, torch)),
      common.markdown_table(["3×3 conv", "ours fwd", "ours d-input", "ours d-kernel", "YNNPACK fwd",
                             "YNNPACK d-input", "YNNPACK d-kernel", "torch fwd", "torch d-input", "torch d-kernel"],
                            conv3_rows(args, torch)),
  ]
  common.print_report(["CPU kernels in isolation, median ms per call"], watch, "\n\n".join(tables))


if __name__ == "__main__":
  common.run(main)
