"""Rematerialisation of model blocks, chosen by config (`model.remat`), to trade compute for activation memory.

  'none'           every block's activations are kept for the backward pass (fastest, most memory).
  'full'           a block keeps only its inputs; everything inside it is recomputed in the backward pass.
  'dots_saveable'  a block keeps the outputs of its weight matmuls (projections, MLPs) and recomputes the rest:
                   norms, activations, and attention's scores and softmax.

'dots_saveable' is `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`, not `dots_saveable` (which saves
every dot): attention's QKᵀ and its weighted sum of values are dots with batch dimensions (batch and heads) whose
outputs grow with the square of the sequence length, while costing little to recompute; the weight matmuls hold
most of the FLOPs and their outputs are only tokens × width. This is MaxText's 'minimal' policy. Convolutions are
not dots, so in the U-Net's and VAE's resnet blocks 'dots_saveable' recomputes nearly as much as 'full'.

Blocks are applied as pure functions of their split state under `jax.checkpoint`, so the module tree (and with
it every parameter's name, which checkpoints and pretrained loaders rely on) is the same under every policy.
"""
from __future__ import annotations

import jax
from flax import nnx

from diffusion_jax.config import ConfigError

POLICIES = ("none", "full", "dots_saveable")
_SAVEABLE = {"full": None, "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def check(policy: str) -> str:
  if policy not in POLICIES:
    raise ValueError(f"remat must be one of {', '.join(POLICIES)}; got {policy!r}")
  return policy


def from_config(model_cfg) -> str:
  """The policy a config's `model` section asks for (`model.remat`)."""
  policy = model_cfg.remat
  if policy not in POLICIES:
    raise ConfigError(f"model.remat must be one of {', '.join(POLICIES)}; got {policy!r}")
  return policy


def apply(block: nnx.Module, policy: str, *args, **static_kwargs):
  """`block(*args, **static_kwargs)`, its activations kept or recomputed for the backward pass as `policy` says.

  `args` are arrays (or None); `static_kwargs` are Python values such as `is_causal=True`, closed over rather than
  traced. The block must keep all its state in variables it does not change (true of every model here).
  """
  if check(policy) == "none":
    return block(*args, **static_kwargs)
  graphdef, state = nnx.split(block)

  def call(state, *args):
    return nnx.merge(graphdef, state)(*args, **static_kwargs)

  return jax.checkpoint(call, policy=_SAVEABLE[policy])(state, *args)
