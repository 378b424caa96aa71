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
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import common

ATTENTION = [(8, 1024, 1024, 8, 8), (8, 256, 256, 16, 8), (8, 1024, 77, 8, 8), (64, 49, 49, 4, 16)]
GROUP_NORM = [(64, 28, 16, 8), (64, 28, 32, 8), (64, 14, 64, 8), (64, 7, 64, 8), (8, 32, 128, 32)]
POINTWISE = [(64, 28, 48, 32), (64, 14, 96, 32), (8, 32, 128, 64)]


def _ms(fn, args, sync=jax.block_until_ready):
  return 1e3 * common.time_per_call(fn, warmup=2, iters=args.iters, repeats=args.repeats, sync=sync)[0]


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
    tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))) for x in (q, k, v))
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
    tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).requires_grad_()
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
    tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).requires_grad_()
    tw = torch.zeros(o, c, 1, 1, requires_grad=True)
    tb = torch.zeros(o, requires_grad=True)

    def torch_step():
      out = torch.nn.functional.conv2d(tx, tw, tb)
      torch.sin(out).sum().backward()
      return out

    rows.append([f"1×1 conv B{b} {hw}×{hw} {c}→{o}, fwd + bwd", common.fmt(_ms(lambda: f_ours(params, x), args)),
                 common.fmt(_ms(lambda: f_theirs(params, x), args)), common.fmt(_ms(torch_step, args, sync=None))])
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--iters", type=int, default=5, help="calls per timed window")
  parser.add_argument("--repeats", type=int, default=5, help="timed windows; the median is reported")
  parser.add_argument("--torch-threads", type=int, default=common.DEFAULT_TORCH_THREADS)
  parser.add_argument("--quick", action="store_true", help="smoke run: one shape per kernel, 1 window of 1 call")
  args = parser.parse_args(argv)
  if args.quick:
    args.iters, args.repeats = 1, 1
  watch = common.OtherCpuUse()
  torch = common.setup_torch(args.torch_threads)
  tables = [
      common.markdown_table(["attention", "ours ms", "jax 'xla' ms", "torch sdpa ms", "max |ours - jax|"],
                            attention_rows(args, torch)),
      common.markdown_table(["group norm", "ours fwd", "nnx fwd", "torch fwd", "ours fwd+bwd", "nnx fwd+bwd",
                             "torch fwd+bwd"], group_norm_rows(args, torch)),
      common.markdown_table(["1×1 conv", "ours ms", "nnx.Conv ms", "torch ms"], pointwise_rows(args, torch)),
  ]
  common.print_report(["CPU kernels in isolation, median ms per call"], watch, "\n\n".join(tables))


if __name__ == "__main__":
  common.run(main)
