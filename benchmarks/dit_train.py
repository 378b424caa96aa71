"""DiT training-step throughput: ours (JAX) against diffusers' `DiTTransformer2DModel` (PyTorch) at the same config.

  python -m benchmarks.dit_train                         # the DiT of configs/mnist_dit.py, batch 64
  python -m benchmarks.dit_train --variant S/2 --image-size 32 --channels 4 --batch 8   # DiT-S/2 on SD latents
  python -m benchmarks.dit_train --quick                 # a seconds-long smoke run

Rows (same batch, same random inputs: noisy images, integer time steps, class labels, a target):
  jax-dit        our DiT alone: forward + MSE + backward + AdamW, one jitted program with donated state.
  diffusers-dit  `DiTTransformer2DModel.from_config(pretrained.dit.diffusers_config(cfg))`, torch AdamW, 2 threads.
  jax-trainer    (mnist config only) `Trainer.compile_train_step` of configs/mnist_dit.py: what the CLI runs per step
                 (label dropout, t and noise sampling, gradient clipping, EMA on top of jax-dit).
GFLOP/s is XLA's cost-analysis count of the jax-dit step × steps/s (the diffusers row reuses that count, so its
ratio is the images/s ratio); "% peak" divides by the machine's float32 matmul peak (faster of jnp.dot/torch.matmul).
"""
from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import common, op_profile, reference

LR = 1e-4


def model_config(args):
  """The DiT under test: configs/mnist_dit.py's, or `--variant` at the given image size and channels."""
  from configs import mnist_dit
  from diffusion_jax.models.dit import dit_config
  from diffusion_jax.train.task import get_task
  config = mnist_dit.get_config()
  if args.variant == "mnist":
    return config, get_task(config).denoiser_config()
  return None, dit_config(args.variant, input_size=args.image_size, in_channels=args.channels, learn_sigma=False,
                          num_classes=args.num_classes)


def random_inputs(cfg, batch: int, image_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  shape = (batch, image_size, image_size, cfg.in_channels)
  return dict(x=rng.standard_normal(shape, np.float32), t=rng.integers(0, 1000, (batch,)).astype(np.int32),
              y=rng.integers(0, cfg.num_classes, (batch,)).astype(np.int32),
              target=rng.standard_normal(shape[:3] + (cfg.output_channels,), np.float32))


def bench_jax(cfg, inputs, args) -> dict:
  from diffusion_jax.models.dit import DiT
  graphdef, params = nnx.split(DiT(cfg, rngs=nnx.Rngs(0)))

  def loss_fn(p, batch):
    out = nnx.merge(graphdef, p)(batch["x"], batch["t"], batch["y"])
    return jnp.mean(jnp.square(out - batch["target"]))

  return common.time_adamw_step(loss_fn, params, inputs, args, lr=LR)


def bench_diffusers(cfg, inputs, args) -> dict:
  torch = common.setup_torch(args.torch_threads)
  from diffusers import DiTTransformer2DModel
  from diffusion_jax.pretrained.dit import diffusers_config
  torch.manual_seed(0)
  kwargs = {k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")}
  model = DiTTransformer2DModel.from_config(kwargs)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
  x = torch.from_numpy(np.ascontiguousarray(inputs["x"].transpose(0, 3, 1, 2)))
  target = torch.from_numpy(np.ascontiguousarray(inputs["target"].transpose(0, 3, 1, 2)))
  t, y = torch.from_numpy(inputs["t"]).long(), torch.from_numpy(inputs["y"]).long()

  def step():
    opt.zero_grad(set_to_none=True)
    out = model(x, timestep=t, class_labels=y).sample
    loss = torch.mean(torch.square(out - target))
    loss.backward()
    opt.step()
    return loss

  seconds, _ = common.time_per_call(step, warmup=args.warmup, iters=args.steps, repeats=args.repeats, sync=None)
  return dict(seconds=seconds, params=reference.count_params(model))


def bench_trainer(config, args) -> dict:
  d = config.data
  rng = np.random.default_rng(0)
  host = dict(image=rng.uniform(-1, 1, (args.batch, d.image_size, d.image_size, d.channels)).astype(np.float32),
              tokens=np.zeros((args.batch, d.max_text_len), np.int32),
              label=rng.integers(0, 10, (args.batch,)).astype(np.int32), valid=np.ones((args.batch,), np.float32))
  return common.time_trainer_step(config, host, args)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variant", default="mnist", help="'mnist' (configs/mnist_dit.py's DiT) or a name like S/2")
  parser.add_argument("--image-size", type=int, default=32, help="with --variant: input height = width")
  parser.add_argument("--channels", type=int, default=4, help="with --variant: input channels (4: SD latents)")
  parser.add_argument("--num-classes", type=int, default=1000, help="with --variant")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=10, help="timed steps per window")
  parser.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--torch-threads", type=int, default=common.DEFAULT_TORCH_THREADS)
  parser.add_argument("--skip", default="", help="comma-separated rows to leave out: jax-dit,diffusers-dit,jax-trainer")
  op_profile.add_flag(parser)
  parser.add_argument("--quick", action="store_true", help="smoke run: batch 8, 2 steps, 1 window")
  args = parser.parse_args(argv)
  args.profile_dir = op_profile.dump_dir_for(args)
  watch = common.OtherCpuUse()
  if args.quick:
    args.batch, args.steps, args.repeats, args.warmup = 8, 2, 1, 1
  skip = set(filter(None, args.skip.split(",")))

  config, cfg = model_config(args)
  image_size = cfg.input_size
  inputs = random_inputs(cfg, args.batch, image_size)
  n = 256 if args.quick else 2048
  machine_peak, peak_line = common.peak_summary(common.measure_matmul_peak(n, torch_threads=args.torch_threads), n)

  results = {}
  if "jax-dit" not in skip:
    results["jax-dit"] = bench_jax(cfg, inputs, args)
  if "diffusers-dit" not in skip:
    results["diffusers-dit"] = bench_diffusers(cfg, inputs, args)
  if config is not None and "jax-trainer" not in skip:
    results["jax-trainer"] = bench_trainer(config, args)

  rows = common.throughput_rows(results, baseline="diffusers-dit", batch=args.batch, peak=machine_peak,
                                default_flops=results.get("jax-dit", {}).get("flops", 0.0))

  tokens = (image_size // cfg.patch_size) ** 2
  common.print_report(
      [f"DiT training step ({args.variant}), batch {args.batch}, median of {args.repeats} windows of {args.steps} "
       f"steps",
       f"hidden {cfg.hidden_size}, depth {cfg.depth}, heads {cfg.num_heads}, patch {cfg.patch_size}, input "
       f"{image_size}x{image_size}x{cfg.in_channels} ({tokens} tokens), {cfg.num_classes} classes"],
      watch, common.markdown_table(["row", "params", "steps/s", "images/s", "GFLOP/step", "GFLOP/s", "% peak",
                                    "vs diffusers"], rows), notes=[peak_line])

  op_profile.profile_rows(results, args)


if __name__ == "__main__":
  common.run(main)
