"""Sampling throughput: 50-step DDIM with classifier-free guidance on the default model, three ways.

  python -m benchmarks.sampling                   # the README table: batch 100, 50 steps
  python -m benchmarks.sampling --quick           # a seconds-long smoke run (batch 4, 3 steps)

Rows (same U-Net config, random weights, the same random text states; the U-Net runs at twice the batch, the
conditional and unconditional halves together, as in `classifier_free_guidance`):
  jax-scan        `samplers.sample` under one `jax.jit`: all steps are a `lax.scan` in one compiled program.
  jax-python-loop the same model and step maths, one jitted guided-denoise + `ddim_step` call per step from Python.
  diffusers       diffusers' DDIMScheduler (cosine "squaredcos_cap_v2", leading spacing, clip_sample, alpha_bar = 1
                  after the last step: the same chain) + diffusers' UNet2DConditionModel under torch.inference_mode.
Text encoding is left out of every row: it runs once per batch, not once per step. GFLOP/s uses XLA's FLOP count of
one jitted guided step (jax-python-loop) times the number of steps, for every row.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import common, reference
from diffusion_jax.diffusion import samplers
from diffusion_jax.diffusion.schedules import NoiseSchedule


def _cfg_inputs(cfg, config, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Noise x_T [B, H, W, C] and doubled text states/pooled [2B, ...] (conditional half first)."""
  d = config.data
  rng = np.random.default_rng(seed)
  out = dict(noise=rng.standard_normal((batch, d.image_size, d.image_size, d.channels), np.float32),
             states=rng.standard_normal((2 * batch, d.max_text_len, cfg.cross_attention_dim), np.float32))
  if cfg.pooled_dim:
    out["pooled"] = rng.standard_normal((2 * batch, cfg.pooled_dim), np.float32)
  return out


def bench_jax(cfg, config, inputs, args) -> dict:
  dcfg = config.diffusion
  schedule = NoiseSchedule.create(dcfg.schedule, dcfg.num_timesteps, dcfg.beta_start, dcfg.beta_end)
  graphdef, params, rest = reference.jax_unet(cfg)
  arrays = {k: jnp.asarray(v) for k, v in inputs.items()}

  def guided_model(params, states, pooled):
    unet = nnx.merge(graphdef, params, rest)
    batched = lambda x, t: unet(x, t, states, pooled=pooled)
    return samplers.classifier_free_guidance(batched, args.guidance_scale)

  # (a) the whole chain as one program.
  def sample_all(params, noise, states, pooled):
    return samplers.sample(guided_model(params, states, pooled), schedule, noise, None, sampler="ddim",
                           num_steps=args.num_steps, eta=0.0, prediction_type=dcfg.prediction_type, clip_x0=True)

  scan_fn = jax.jit(sample_all).lower(params, arrays["noise"], arrays["states"], arrays.get("pooled")).compile()

  # (b) one program per step, driven from Python.
  def one_step(params, x, t, t_prev, states, pooled):
    out = guided_model(params, states, pooled)(x, jnp.full((x.shape[0],), t, jnp.int32))
    return samplers.ddim_step(schedule, out, x, t, t_prev, eta=0.0, prediction_type=dcfg.prediction_type,
                              clip_x0=True)[0]

  ts = samplers.sampling_timesteps(schedule.num_timesteps, args.num_steps)
  chain = [(jnp.int32(t), jnp.int32(t_prev)) for t, t_prev in zip(ts, list(ts[1:]) + [-1])]
  step_fn = jax.jit(one_step, donate_argnums=(1,)).lower(
      params, arrays["noise"], chain[0][0], chain[0][1], arrays["states"], arrays.get("pooled")).compile()

  def python_loop():
    x = jnp.array(arrays["noise"])  # a fresh buffer: the step donates it
    for t, t_prev in chain:
      x = step_fn(params, x, t, t_prev, arrays["states"], arrays.get("pooled"))
    return x

  run_scan = lambda: scan_fn(params, arrays["noise"], arrays["states"], arrays.get("pooled"))
  # These untimed runs are the warm-up; they also check that the two JAX rows compute the same thing.
  x_scan, x_loop = jax.device_get((run_scan(), python_loop()))
  np.testing.assert_allclose(x_scan, x_loop, atol=2e-3)
  timing = dict(warmup=0, iters=1, repeats=args.repeats)
  return {"jax-scan": common.time_per_call(run_scan, **timing)[0],
          "jax-python-loop": common.time_per_call(python_loop, **timing)[0],
          "step_flops": common.compiled_flops(step_fn)}


def bench_diffusers(cfg, config, inputs, args) -> float:
  torch = common.setup_torch(args.torch_threads)
  from diffusers import DDIMScheduler
  dcfg = config.diffusion
  if dcfg.schedule != "cosine":
    raise NotImplementedError("the diffusers row maps only the cosine schedule")
  scheduler = DDIMScheduler(num_train_timesteps=dcfg.num_timesteps, beta_schedule="squaredcos_cap_v2",
                            clip_sample=True, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
                            prediction_type=dcfg.prediction_type)
  model = reference.diffusers_unet(cfg, config.data.image_size).eval()
  scheduler.set_timesteps(args.num_steps)
  noise = torch.from_numpy(np.ascontiguousarray(inputs["noise"].transpose(0, 3, 1, 2)))
  states = torch.from_numpy(inputs["states"])
  pooled = torch.from_numpy(inputs["pooled"]) if "pooled" in inputs else None

  def run():
    scheduler.set_timesteps(args.num_steps)
    x = noise.clone()
    with torch.inference_mode():
      for t in scheduler.timesteps:
        out = model(torch.cat([x, x]), t, encoder_hidden_states=states, class_labels=pooled).sample
        cond, uncond = out.chunk(2)
        x = scheduler.step(uncond + args.guidance_scale * (cond - uncond), t, x).prev_sample
    return x

  with torch.inference_mode():  # warm-up: a few U-Net calls at the timed batch, not a whole 50-step run
    for _ in range(2):
      model(torch.cat([noise, noise]), scheduler.timesteps[0], encoder_hidden_states=states, class_labels=pooled)
  return common.time_per_call(run, warmup=0, iters=1, repeats=args.repeats, sync=None)[0]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=100, help="images per run (the U-Net sees twice as many)")
  parser.add_argument("--num-steps", type=int, default=50)
  parser.add_argument("--guidance-scale", type=float, default=3.0)
  parser.add_argument("--repeats", type=int, default=2, help="timed runs per row; the median is reported")
  parser.add_argument("--torch-threads", type=int, default=common.DEFAULT_TORCH_THREADS)
  parser.add_argument("--skip-diffusers", action="store_true")
  parser.add_argument("--quick", action="store_true", help="smoke run: batch 4, 3 steps, 1 timed run")
  args = parser.parse_args(argv)
  watch = common.OtherCpuUse()
  if args.quick:
    args.batch, args.num_steps, args.repeats = 4, 3, 1

  config = reference.default_config()
  from diffusion_jax.train.task import get_task
  cfg = get_task(config).denoiser_config()
  inputs = _cfg_inputs(cfg, config, args.batch)
  n = 256 if args.quick else 2048
  machine_peak, peak_line = common.peak_summary(common.measure_matmul_peak(n, torch_threads=args.torch_threads), n)

  res = bench_jax(cfg, config, inputs, args)
  seconds = {k: res[k] for k in ("jax-scan", "jax-python-loop")}
  if not args.skip_diffusers:
    seconds["diffusers"] = bench_diffusers(cfg, config, inputs, args)
  run_flops = res["step_flops"] * args.num_steps
  base = seconds.get("diffusers")
  rows = []
  for name, sec in seconds.items():
    gflops = run_flops / sec / 1e9
    rows.append([name, common.fmt(args.batch / sec), common.fmt(sec), common.fmt(1e3 * sec / args.num_steps),
                 common.fmt(gflops), f"{100 * gflops / machine_peak:.1f}%",
                 common.fmt(base / sec) + "×" if base else "-"])

  common.print_report(
      [f"DDIM sampling, {args.num_steps} steps, classifier-free guidance {args.guidance_scale}, configs/mnist_ddpm.py "
       f"U-Net, {args.batch} images per run (U-Net batch {2 * args.batch}), median of {args.repeats} runs",
       reference.describe(cfg)],
      watch, common.markdown_table(["row", "images/s", "s/run", "ms/step", "GFLOP/s", "% peak", "vs diffusers"], rows),
      notes=[f"{peak_line}; {common.fmt(run_flops / 1e9)} GFLOP per run"])


if __name__ == "__main__":
  common.run(main)
