"""VAE, GANs and diffusion on MNIST side by side, judged alike: digit accuracy of class- or caption-conditioned
samples by the independent classifier, the domain Fréchet distance to the MNIST test split in that classifier's
penultimate features, within-class diversity, and the sampling time per image.

  python -m benchmarks.generative_families \\
      --run "conditional VAE=configs/mnist_cvae.py@/tmp/fam/cvae" \\
      --run "DCGAN=configs/mnist_gan.py:dcgan@/tmp/fam/dcgan" \\
      --run "DDPM U-Net=configs/mnist_ddpm.py@/tmp/mnist_ddpm" \
      --run "classifier-guided=configs/mnist_ddpm.py:unconditional@/tmp/uncond|sample.classifier_guidance.workdir=/tmp/clf,sample.classifier_guidance.scale=3"

Text after a `|` sets config values for that row only (comma-separated KEY=VALUE, values as Python literals or
plain strings): guidance settings, a sampler, a scale. Each run's newest checkpoint is restored (EMA parameters where the run evaluates with them) and sampled with its
config's sampler settings, `--per-class` samples per digit, one fixed seed. Sampling time is the evaluation's
generate call (after one chunk of `sample.batch_size` images compiled it) divided by the number of images; for
diffusion it includes every sampler step and classifier-free guidance. The last row is as many real MNIST test
digits per class: real handwriting at that sample count, a reference rather than a bound for the Fréchet distance
(the class GAN scores below it), and the diversity of real handwriting.
"""
from __future__ import annotations

import argparse
import time

from benchmarks import common
from benchmarks.sampler_nfe import load_config


def parse_run(text: str) -> tuple[str, str, str, dict]:
  import ast
  text, _, settings = text.partition("|")
  name, sep, rest = text.partition("=")
  config, sep2, workdir = rest.rpartition("@")
  if not (sep and sep2 and name and config and workdir):
    raise SystemExit(f"--run {text!r}: expected NAME=CONFIG[:arg]@WORKDIR[|KEY=VALUE,...]")
  overrides = {}
  for item in filter(None, settings.split(",")):
    key, eq, value = item.partition("=")
    if not eq:
      raise SystemExit(f"--run {text!r}: {item!r} is not KEY=VALUE")
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value
  return name, config, workdir, overrides


def run_config(config_spec: str, workdir: str):
  """The config file's `get_config`, with every setting the run saved with its checkpoint (paths to the runs it
  reuses, overrides it was started with) written over it; settings newer than the run keep the file's value."""
  from diffusion_jax.train import runs
  config = load_config(config_spec)
  saved = runs.RunSource("--run", workdir, task=config.task).config()

  def overlay(target, source):
    for key, value in source.items():
      if key not in target:
        continue
      if hasattr(target[key], "items") and hasattr(value, "items"):
        overlay(target[key], value)
      else:
        target[key] = value

  with config.unlocked():
    overlay(config, saved)
  return config


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--run", action="append", required=True, help="NAME=CONFIG[:arg]@WORKDIR (repeatable)")
  parser.add_argument("--per-class", type=int, default=50, help="samples per digit")
  parser.add_argument("--seed", type=int, default=1234)
  args = parser.parse_args(argv)
  watch = common.OtherCpuUse()
  t_start = time.time()

  import ml_collections
  from diffusion_jax.defaults import evaluator
  from diffusion_jax.evaluators.digits import DigitAccuracy
  from diffusion_jax.train.trainer import Trainer

  headers = ["model", "step", "digit accuracy", "Fréchet distance", "diversity", "sampling per image"]
  table, real = [], None
  for text in args.run:
    name, config_spec, workdir, overrides = parse_run(text)
    config = run_config(config_spec, workdir)
    for key, value in overrides.items():
      *path, leaf = key.split(".")
      section = config
      for part in path:
        section = section[part]
      section[leaf] = value
    trainer = Trainer(config, workdir)
    state = trainer.load_for_inference()
    ctx = trainer.model_context(state)
    task = trainer.task
    spec = config.evals.digits if "digits" in config.evals else evaluator("digit_accuracy")
    spec = ml_collections.ConfigDict(dict(spec.to_dict(), per_class=args.per_class, seed=args.seed, frechet=True,
                                          diversity=True, clip_score=False, every=0))
    judged = DigitAccuracy("digits", task, config, spec)
    generate, seconds = task.generate, []

    def timed(*a, **k):
      t0 = time.perf_counter()
      images = generate(*a, **k)
      seconds.append(time.perf_counter() - t0)
      return images

    task.generate = timed
    prompts, labels = task.label_prompts(args.per_class, (tuple(spec.templates) or ("",))[0])
    warm = min(len(prompts), int(config.sample.batch_size))  # one chunk of the size generate runs: compiles it
    task.generate(ctx, prompts[:warm], args.seed, labels=labels[:warm])
    scores = judged.run(ctx)
    key = spec.key or "digit_accuracy"
    per_image = seconds[-1] / len(prompts)
    table.append([name, str(int(state.step)), f"{100 * scores[key]:.1f}%", f"{scores[key + '_frechet']:.2f}",
                  f"{scores[key + '_diversity']:.2f}", f"{per_image * 1e3:.3g} ms"])
    real = [f"MNIST test digits ({args.per_class} per class)", "—", "—", f"{scores[key + '_frechet_real']:.2f}",
            f"{scores[key + '_diversity_real']:.2f}", "—"]
    print(" | ".join(table[-1]), flush=True)

  print(f"\n{args.per_class} samples per digit, seed {args.seed}; {common.environment_line()}; "
        f"{time.time() - t_start:.0f}s wall")
  print(watch.line() + "\n")
  print(common.markdown_table(headers, table + [real]))


if __name__ == "__main__":
  common.run(main)
