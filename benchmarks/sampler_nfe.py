"""Sample quality against the number of model evaluations (NFE), per sampler, for a trained class-conditional run.

  python -m benchmarks.sampler_nfe --config configs/mnist_dit.py --workdir /tmp/mnist_dit
  python -m benchmarks.sampler_nfe --config configs/mnist_dit.py:flow --workdir /tmp/mnist_dit_flow
  python -m benchmarks.sampler_nfe --config configs/mnist_dit.py --workdir DIR --nfe 5,10 --per-class 5  # quicker

Quality is `eval/digit_accuracy`: the share of generated digits (`--per-class` per digit, fixed seed, the config's
guidance scale) that the independent MNIST classifier labels as the requested digit. The run's newest checkpoint
(EMA parameters, as the end-of-run eval uses) is restored from `--workdir`.

NFE counts guided model evaluations (each one call on the doubled conditional + unconditional batch). Heun spends
two per step except on the last, so it runs (NFE + 1) // 2 steps and its cells show the 2·steps - 1 it really used.
A DDPM-trained model is sampled by every sampler but flow_euler; a flow model by flow_euler only.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time

from benchmarks import common

DIFFUSION_SAMPLERS = ("ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_ancestral", "heun")
FLOW_SAMPLERS = ("flow_euler",)


def load_config(spec: str):
  """`path.py[:arg]` → that file's `get_config(arg)`, as `--config` does for the main entry point (a file of the
  `configs` package is imported as part of it, so its relative imports work)."""
  path, _, arg = spec.partition(":")
  path = os.path.abspath(path)
  root = os.path.dirname(os.path.dirname(path))
  if root not in sys.path:
    sys.path.insert(0, root)
  if os.path.isfile(os.path.join(os.path.dirname(path), "__init__.py")):
    package = os.path.basename(os.path.dirname(path))
    module = importlib.import_module(f"{package}.{os.path.splitext(os.path.basename(path))[0]}")
  else:
    module_spec = importlib.util.spec_from_file_location("_benchmark_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  return module.get_config(arg)


def steps_for(sampler: str, nfe: int) -> tuple[int, int]:
  """(sampler steps, model evaluations they cost) for a budget of `nfe` evaluations."""
  if sampler == "heun":
    steps = max((nfe + 1) // 2, 1)
    return steps, 2 * steps - 1
  return nfe, nfe


def with_sampler(config, row: str, num_steps: int):
  """A copy of `config` whose `sample` section runs `row` ('…_karras' = Karras sigmas) for `num_steps`."""
  config = config.copy_and_resolve_references()
  config.unlock()
  config.sample.sampler = row.removesuffix("_karras")
  config.sample.use_karras_sigmas = row.endswith("_karras")
  config.sample.num_steps = num_steps
  config.lock()
  return config


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="the run's config, path.py[:arg]")
  parser.add_argument("--workdir", required=True, help="the run's directory (its newest checkpoint is used)")
  parser.add_argument("--nfe", default="5,10,20,50", help="comma-separated model-evaluation budgets")
  parser.add_argument("--samplers", default="", help="comma-separated rows (default: all that fit the objective)")
  parser.add_argument("--per-class", type=int, default=20, help="samples per digit in each cell")
  parser.add_argument("--guidance-scale", type=float, default=None, help="default: the config's")
  parser.add_argument("--clip-x0", choices=("config", "on", "off"), default="config",
                      help="clip each x_0 prediction to [-1, 1] (default: the config's sample.clip_x0)")
  parser.add_argument("--seed", type=int, default=1234)
  args = parser.parse_args(argv)
  watch = common.OtherCpuUse()
  t_start = time.time()

  import jax
  from diffusion_jax.eval import digit_classifier
  from diffusion_jax.train.task import get_task
  from diffusion_jax.train.trainer import Trainer

  config = load_config(args.config)
  if args.clip_x0 != "config":
    with config.unlocked():
      config.sample.clip_x0 = args.clip_x0 == "on"
  is_flow = config.diffusion.objective == "flow"
  rows = tuple(filter(None, args.samplers.split(","))) or (FLOW_SAMPLERS if is_flow else DIFFUSION_SAMPLERS)
  budgets = [int(n) for n in args.nfe.split(",")]
  trainer = Trainer(config, args.workdir)
  state = trainer.load_for_inference()
  ctx = trainer.model_context(state)
  scale = config.sample.guidance_scale if args.guidance_scale is None else args.guidance_scale
  judge = digit_classifier.load_or_train()

  table = []
  with jax.set_mesh(trainer.mesh):
    for row in rows:
      cells = [row]
      for nfe in budgets:
        steps, used = steps_for(row, nfe)
        task = get_task(with_sampler(config, row, steps))
        t0 = time.time()
        prompts, labels = task.label_prompts(args.per_class)
        images = task.generate(ctx, prompts, args.seed, labels=labels, guidance_scale=scale)
        acc = digit_classifier.accuracy(judge, images, labels)["accuracy"]
        cells.append(f"{100 * acc:.1f}%" + (f" ({used})" if used != nfe else ""))
        print(f"{row} NFE {used} ({steps} steps): {100 * acc:.1f}% in {time.time() - t0:.0f}s", flush=True)
      table.append(cells)

  d = config.diffusion
  print(f"\nDigit accuracy vs NFE, {args.config} at step {int(state.step)} ({args.workdir}); "
        f"{args.per_class} samples per digit, seed {args.seed}, guidance {scale}, "
        f"clip_x0={config.sample.clip_x0}, "
        + ("flow (velocity) model" if is_flow else f"{d.schedule} schedule, {d.prediction_type} model"))
  print(f"{common.environment_line()}; {time.time() - t_start:.0f}s wall")
  print(watch.line() + "\n")
  print(common.markdown_table(["sampler"] + [f"NFE {n}" for n in budgets], table))


if __name__ == "__main__":
  common.run(main)
