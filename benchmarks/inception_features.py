"""FID feature extraction throughput: our InceptionV3 (JAX) against torch-fidelity's port of the same TensorFlow
graph (PyTorch), same random weights, same 299×299 inputs, in one run.

  python -m benchmarks.inception_features              # batch 50, the batch pytorch-fid and clean-fid use
  python -m benchmarks.inception_features --quick      # a seconds-long smoke run

Rows: jax-inception (the jitted forward to the 2048-d pool, what `eval.fid.InceptionFeatures` runs per batch) and
torch-fidelity (FeatureExtractorInceptionV3 in eval mode under torch.no_grad, torch.set_num_threads(2)). The inputs
are already resized: both spend the same time in the clean-fid resize, which runs in PIL. GFLOP/s is XLA's count
of the JAX forward times its rate; "% peak" divides by the machine's float32 matmul peak.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from benchmarks import common, reference


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=50)
  parser.add_argument("--steps", type=int, default=3, help="timed batches per window")
  parser.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported")
  parser.add_argument("--torch-threads", type=int, default=common.DEFAULT_TORCH_THREADS)
  parser.add_argument("--quick", action="store_true", help="smoke run: batch 2, 1 step, 1 window")
  args = parser.parse_args(argv)
  if args.quick:
    args.batch, args.steps, args.repeats = 2, 1, 1
  watch = common.OtherCpuUse()
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from diffusion_jax.models.inception import InceptionV3
  from diffusion_jax.pretrained.inception import inception_pairs
  from diffusion_jax.pretrained.weights import model_arrays, state_from_pairs

  torch = common.setup_torch(args.torch_threads)
  model = InceptionV3(rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)["2048"])
  x = np.random.default_rng(0).uniform(-1, 1, (args.batch, 299, 299, 3)).astype(np.float32)
  xj = jnp.asarray(x)
  flops = common.compiled_flops(forward.lower(state, xj).compile())
  n = 256 if args.quick else 2048
  peak, peak_line = common.peak_summary(common.measure_matmul_peak(n, torch_threads=args.torch_threads), n)
  results = {"jax-inception": {"seconds": common.time_per_call(lambda: forward(state, xj), iters=args.steps,
                                                               repeats=args.repeats)[0], "flops": flops}}

  net = reference.torch_fidelity_inception()
  if net is None:
    raise SystemExit("error: pip install --no-deps torch-fidelity==0.4.0 (the PyTorch reference)")
  arrays = model_arrays(model)
  net.load_state_dict({k: torch.tensor(v) for k, v in state_from_pairs(arrays, inception_pairs(arrays)).items()},
                      strict=False)
  net.eval()
  # Its forward takes uint8 and resizes to 299 (the identity here); the same images as bytes.
  xt = torch.from_numpy(np.clip(np.round(x * 128 + 128), 0, 255).astype(np.uint8)).permute(0, 3, 1, 2).contiguous()

  def torch_forward():
    with torch.no_grad():
      return net(xt)

  results["torch-fidelity"] = {"seconds": common.time_per_call(torch_forward, iters=args.steps, repeats=args.repeats,
                                                               sync=None)[0]}
  params = sum(int(np.prod(v.shape)) for v in arrays.values())
  for r in results.values():
    r["params"] = params
  rows = common.throughput_rows(results, baseline="torch-fidelity", batch=args.batch, peak=peak, default_flops=flops)
  common.print_report(
      [f"FID InceptionV3 forward to the 2048-d pool, batch {args.batch} at 299×299, median of {args.repeats} "
       f"windows of {args.steps} batches"],
      watch, common.markdown_table(["row", "params", "batches/s", "images/s", "GFLOP/batch", "GFLOP/s", "% peak",
                                    "vs torch-fidelity"], rows), notes=[peak_line])


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  common.run(main)
