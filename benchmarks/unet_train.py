"""Training-step throughput of the default U-Net: ours (JAX) against diffusers (PyTorch), and our whole trainer step.

  python -m benchmarks.unet_train                 # the README table: batch 64
  python -m benchmarks.unet_train --quick         # a seconds-long smoke run (batch 8, 2 steps)
  python -m benchmarks.unet_train --batch 32 --steps 10

Rows (all at the same batch, on the same random inputs):
  jax-unet       our U-Net alone: forward + backward + AdamW, one jitted program with donated state.
  diffusers-unet diffusers' UNet2DConditionModel built from the same config, torch AdamW, torch.set_num_threads(2).
  jax-trainer    `Trainer.compile_train_step` of configs/mnist_ddpm.py: text encoder + U-Net + loss sampling of
                 t and noise + AdamW with clipping + EMA, i.e. what `python -m diffusion_jax.main` runs per step.
GFLOP/s is XLA's cost-analysis FLOP count of the step times steps/s; the torch row reuses the jax-unet count so
that GFLOP/s and images/s give the same ratio. "% peak" divides by the machine's float32 matmul peak (the faster of
jnp.dot and torch.matmul on 2048² matrices).
"""
from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import common, op_profile, reference

LR = 1e-4  # plain AdamW on both sides: no clipping, no weight decay, no schedule


def bench_jax_unet(cfg, inputs, args) -> dict:
  graphdef, params, rest = reference.jax_unet(cfg)

  def loss_fn(p, batch):
    out = nnx.merge(graphdef, p, rest)(batch["x"], batch["t"], batch["states"], pooled=batch.get("pooled"))
    return jnp.mean(jnp.square(out - batch["target"]))

  return common.time_adamw_step(loss_fn, params, inputs, args, lr=LR)


def bench_diffusers_unet(cfg, image_size, inputs, args) -> dict:
  torch = common.setup_torch(args.torch_threads)
  model = reference.diffusers_unet(cfg, image_size)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
  batch = reference.to_torch(inputs)

  def step():
    opt.zero_grad(set_to_none=True)
    out = model(batch["x"], batch["t"], encoder_hidden_states=batch["states"],
                class_labels=batch.get("pooled")).sample
    loss = torch.mean(torch.square(out - batch["target"]))
    loss.backward()
    opt.step()
    return loss

  seconds, _ = common.time_per_call(step, warmup=args.warmup, iters=args.steps, repeats=args.repeats, sync=None)
  return dict(seconds=seconds, params=reference.count_params(model))


def bench_trainer(config, args) -> dict:
  from diffusion_jax.data import pipeline
  from diffusion_jax.data.tokenizers import get_tokenizer
  d = config.data
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, (args.batch,)).astype(np.int32)
  host = dict(image=rng.uniform(-1, 1, (args.batch, d.image_size, d.image_size, d.channels)).astype(np.float32),
              tokens=get_tokenizer(d.tokenizer)(pipeline.prompts_for_labels(d, labels), d.max_text_len),
              label=labels, valid=np.ones((args.batch,), np.float32))
  return common.time_trainer_step(config, host, args)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=10, help="timed steps per window")
  parser.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--torch-threads", type=int, default=common.DEFAULT_TORCH_THREADS)
  parser.add_argument("--skip", default="", help="comma-separated rows to leave out: jax-unet,diffusers-unet,"
                                                  "jax-trainer")
  op_profile.add_flag(parser)
  parser.add_argument("--quick", action="store_true", help="smoke run: batch 8, 2 steps, 1 window")
  args = parser.parse_args(argv)
  args.profile_dir = op_profile.dump_dir_for(args)
  watch = common.OtherCpuUse()
  if args.quick:
    args.batch, args.steps, args.repeats, args.warmup = 8, 2, 1, 1
  skip = set(filter(None, args.skip.split(",")))

  config = reference.default_config()
  from diffusion_jax.train.task import get_task
  cfg = get_task(config).denoiser_config()
  d = config.data
  inputs = reference.random_inputs(args.batch, d.image_size, d.channels, d.max_text_len, cfg.cross_attention_dim,
                                   cfg.pooled_dim)
  n = 256 if args.quick else 2048
  machine_peak, peak_line = common.peak_summary(common.measure_matmul_peak(n, torch_threads=args.torch_threads), n)

  results = {}
  if "jax-unet" not in skip:
    results["jax-unet"] = bench_jax_unet(cfg, inputs, args)
  if "diffusers-unet" not in skip:
    results["diffusers-unet"] = bench_diffusers_unet(cfg, d.image_size, inputs, args)
  if "jax-trainer" not in skip:
    results["jax-trainer"] = bench_trainer(config, args)

  rows = common.throughput_rows(results, baseline="diffusers-unet", batch=args.batch, peak=machine_peak,
                                default_flops=results.get("jax-unet", {}).get("flops", 0.0))

  common.print_report(
      [f"U-Net training step, configs/mnist_ddpm.py, batch {args.batch}, median of {args.repeats} windows of "
       f"{args.steps} steps", reference.describe(cfg)],
      watch, common.markdown_table(
          ["row", "params", "steps/s", "images/s", "GFLOP/step", "GFLOP/s", "% peak", "vs diffusers"], rows),
      notes=[peak_line])

  op_profile.profile_rows(results, args)


if __name__ == "__main__":
  common.run(main)
