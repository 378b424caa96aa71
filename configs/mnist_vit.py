"""A small ViT classifying MNIST digits from 1% of the labels (the first 600 training images), from scratch or
starting from a configs/mnist_mae.py run; accuracy on the 10,000 test digits.

  python -m diffusion_jax.main --config configs/mnist_vit.py --workdir /tmp/vit_scratch
  python -m diffusion_jax.main --config configs/mnist_vit.py:finetune --workdir /tmp/vit_mae_ft \\
      --config.classify.init_from=/tmp/mnist_mae
  python -m diffusion_jax.main --config configs/mnist_vit.py:probe --workdir /tmp/vit_mae_probe \\
      --config.classify.init_from=/tmp/mnist_mae
  python -m diffusion_jax.main --config configs/mnist_vit.py:probe --workdir /tmp/vit_random_probe

'' trains the tower of configs/mnist_mae.py from scratch and ':finetune' fine-tunes an MAE (or CLIP) run's tower, both
with MAE's fine-tuning recipe (mean pooling, drop-path, mixup/cutmix, label smoothing), the fine-tuning adding
layer-wise learning-rate decay; ':probe' trains a BatchNorm and a linear head on the frozen tower's class token
(random without init_from). `--config.data.train_split=train` uses all 50,000 labels.
Append ',tiny' (or use ':tiny') for a seconds-long variant for tests.
"""
import ml_collections

from diffusion_jax.defaults import base_config, evaluator

from . import mnist_mae

VARIANTS = ("", "finetune", "probe")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  variant, _, size = arg.partition(",")
  if variant == "tiny":
    variant, size = "", "tiny"
  if variant not in VARIANTS or size not in ("", "tiny"):
    raise ValueError(f"unknown config argument {arg!r}; use '', 'finetune' or 'probe', optionally ',tiny'")
  c = base_config()
  c.task = "classify"
  c.model = mnist_mae.model_config()
  # MAE's fine-tuning recipe, for the from-scratch baseline too, so that only the initialisation differs
  c.model.update(num_classes=0, pooling="mean", pre_logits=0, drop_path=0.1)
  c.classify = ml_collections.ConfigDict(dict(init_from="", linear_probe=False, label_smoothing=0.1, mixup=0.8,
                                              cutmix=1.0))
  c.evals.accuracy = evaluator("accuracy", batch_size=1000)
  c.data.update(image_size=28, train_split="train[:600]")
  c.optim.update(lr=1e-3, weight_decay=0.05, warmup_steps=100)
  c.ema.enabled = False
  c.train.update(steps=1500, batch_size=128, log_every=100, checkpoint_every=500, sample_at_end=False)
  if variant == "finetune":
    c.optim.update(layer_decay=0.75)
  elif variant == "probe":
    c.model.pooling = "cls"
    c.classify.update(linear_probe=True, label_smoothing=0.0, mixup=0.0, cutmix=0.0)
    c.model.drop_path = 0.0
    c.optim.update(name="sgd", lr=0.1, b1=0.9, weight_decay=0.0, warmup_steps=50)  # MAE's LARS stand-in
    c.train.steps = 1000
  if size == "tiny":
    c.model.update(patch_size=7, width=16, layers=2, heads=2, decoder_width=8, decoder_layers=1, decoder_heads=2)
    c.evals.accuracy.update(batch_size=64, max_examples=128)
    c.train.update(steps=3, batch_size=16, log_every=1, checkpoint_every=3, progress_bar=False)
  return c
