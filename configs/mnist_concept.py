"""DreamBooth with LoRA on the latent text-to-image run of configs/mnist_ldm.py: five hand-drawn stars
(diffusion_jax/assets/concept_star) become "a handwritten digit sks", while prior preservation on the base run's own
samples of "a handwritten digit {name}" keeps the ten digits. Needs the three runs of configs/mnist_ldm.py:

  python -m diffusion_jax.main --config configs/mnist_concept.py --workdir /tmp/mnist_star \\
      --config.lora.base_workdir=/tmp/mnist_ldm --config.latent.vae_workdir=/tmp/mnist_vae \\
      --config.text.clip_workdir=/tmp/mnist_clip

`--config.concept.images=DIR` teaches the subject in DIR instead; `--config.concept.num_class_images=0` trains
without prior preservation; `--config.train.steps=0` evaluates the base run as it is (the "before" figures). The
end-of-run eval reports eval/concept_rate and eval/concept_similarity (`evaluators.concept`: do samples of the
prompt show the subject, by the independent MNIST classifier's features) and eval/digit_accuracy (do the digit
prompts still draw their digits); the samples (WORKDIR/samples/step_N) hold the prompt's row, three digit rows and
the adapters as a diffusers LoRA file.

`:tiny` is a seconds-long variant for the tests (give it tiny runs of the three).
"""
import ml_collections

from . import mnist_ldm
from diffusion_jax.defaults import evaluator

PROMPT = "a handwritten digit sks"


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "tiny"):
    raise ValueError(f"unknown config argument {arg!r}; use '' or 'tiny'")
  c = mnist_ldm.get_config(arg)  # the base run's architecture, data and sampler
  c.task = "concept"
  c.latent.cache = False  # a few hundred rows: encoded in the step
  c.concept.update(prompt=PROMPT, class_prompt="a handwritten digit {name}", num_class_images=200,
                   prior_loss_weight=1.0)
  c.lora.update(rank=8, alpha=8.0, targets=("attention",), under="denoiser.unet")
  c.ema.enabled = False  # a few hundred steps: the adapters as trained
  c.optim.update(lr=1e-3, warmup_steps=20, weight_decay=0.0)
  c.train.update(steps=600, batch_size=32, log_every=100, checkpoint_every=600)
  del c.evals["digits_heldout"]
  c.evals.loss.every = -1  # the MNIST test loss says nothing about the subject
  c.evals.concept = evaluator("concept", num_samples=100, every=-1 if arg else 0)
  c.sample.update(prompts=(PROMPT, "a handwritten digit three", "a handwritten digit seven", "a handwritten digit eight"),
                  per_prompt=10)
  if arg == "tiny":
    c.concept.num_class_images = 6
    c.train.update(steps=2, batch_size=8, checkpoint_every=2)
    c.sample.update(per_prompt=1, num_steps=2)
  return c
