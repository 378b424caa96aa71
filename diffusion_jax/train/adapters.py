"""LoRA fine-tuning of any task's model, by config (`config.lora`, `models.lora`):

  --config.lora.rank=8 --config.lora.base_workdir=/tmp/finished_run [--config.lora.targets='("attention",)']
  [--config.lora.under=vision_model] [--config.lora.alpha=16 --config.lora.rslora=True --config.lora.dropout=0.1]

With rank > 0 the task's model gets adapters on the linear and convolution layers `targets` names (regexes or presets, under the
submodule `under`), and only the adapters train: every other parameter is frozen — kept out of optimizer state, EMA
and checkpoints, filled at every start from the task's own weight sources and from `base_workdir`, a finished run of
the same task or of a task its `Task.base_tasks` lists (a concept fine-tune adapts a diffusion run; its EMA weights where
it evaluates with them; `Trainer.weight_sources`). A LoRA run's checkpoints hold its adapters only.
"""
from __future__ import annotations

from typing import Optional

from flax import nnx

from diffusion_jax.config import ConfigError
from diffusion_jax.models import lora
from diffusion_jax.train import parts


def lora_config(config) -> Optional[lora.LoRAConfig]:
  """The config's LoRA settings, or None when `lora.rank` is 0 (or the config has no `lora` section)."""
  section = config.get("lora")
  if section is None or not int(section.rank):
    return None
  try:
    return lora.LoRAConfig(rank=int(section.rank), alpha=float(section.alpha or section.rank),
                           targets=tuple(section.targets), dropout=float(section.dropout),
                           rslora=bool(section.rslora))
  except ValueError as e:
    raise ConfigError(f"lora: {e}") from None


def build_model(task, config, rngs: nnx.Rngs) -> nnx.Module:
  """The task's model, with the config's adapters when it asks for them."""
  model = task.build_model(rngs)
  cfg = lora_config(config)
  if cfg is not None:
    try:
      lora.inject(model, cfg, rngs=nnx.Rngs(int(config.seed) + 1), under=config.lora.under)
    except ValueError as e:
      raise ConfigError(f"lora: {e}") from None
  return model


def partition(task, config) -> parts.Partition:
  """The task's updates and frozen parts, plus the config's `train.frozen`; with LoRA everything but the adapters
  is frozen."""
  frozen = parts.frozen_filter(task.frozen(), config.train.frozen)
  if lora_config(config) is not None:
    frozen = nnx.Any(frozen, nnx.Not(lora.LoRAParam))
  return parts.Partition(task.updates(), frozen)
