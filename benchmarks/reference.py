"""The models under test: our default-config U-Net and its diffusers (PyTorch) twin, plus shared random inputs.

Both benchmarks compare against diffusers' `UNet2DConditionModel` built from the same `UNetConfig`, so a change of
`configs/mnist_ddpm.py` changes both sides. The one structural difference: diffusers' "projection" class embedding
(our pooled-text path) is a two-layer MLP, ours a single linear layer (64·64 + 64 more parameters on its side).
"""
from __future__ import annotations

import numpy as np
from flax import nnx

from configs import mnist_ddpm
from diffusion_jax.models.unet import UNet2DConditionModel, UNetConfig


def default_config():
  return mnist_ddpm.get_config()


def jax_unet(cfg: UNetConfig, seed: int = 0):
  """(graphdef, params, rest) of a randomly initialised U-Net, split once as the trainer does."""
  return nnx.split(UNet2DConditionModel(cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)


def diffusers_kwargs(cfg: UNetConfig) -> dict:
  """`diffusers.UNet2DConditionModel` arguments for the same network as `cfg`."""
  if not cfg.mid_block_attention:
    raise NotImplementedError("the diffusers twin is only written for a mid block with attention")
  if cfg.num_class_embeds:
    raise NotImplementedError("the diffusers twin does not map class-label conditioning")
  levels = len(cfg.block_out_channels)
  heads = tuple(cfg.heads_at(i) for i in range(levels))
  kwargs = dict(
      in_channels=cfg.in_channels, out_channels=cfg.out_channels, block_out_channels=tuple(cfg.block_out_channels),
      layers_per_block=cfg.layers_per_block,
      down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels),
      up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)),
      mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=cfg.cross_attention_dim,
      # diffusers' legacy name: for this class `attention_head_dim` is the number of heads.
      attention_head_dim=heads[0] if len(set(heads)) == 1 else heads,
      transformer_layers_per_block=cfg.transformer_layers_per_block, use_linear_projection=cfg.use_linear_projection,
      norm_num_groups=cfg.norm_num_groups, norm_eps=cfg.norm_eps, flip_sin_to_cos=cfg.flip_sin_to_cos,
      freq_shift=int(cfg.freq_shift),
      resnet_time_scale_shift=getattr(cfg, "resnet_time_scale_shift", "default"))
  if cfg.pooled_dim:
    kwargs.update(class_embed_type="projection", projection_class_embeddings_input_dim=cfg.pooled_dim)
  return kwargs


def diffusers_unet(cfg: UNetConfig, image_size: int, seed: int = 0):
  import torch
  from diffusers import UNet2DConditionModel as TorchUNet
  torch.manual_seed(seed)
  return TorchUNet(sample_size=image_size, **diffusers_kwargs(cfg))


def describe(cfg: UNetConfig) -> str:
  """The U-Net settings that decide its cost, for the line above a table (the default config changes over time)."""
  heads = sorted({cfg.heads_at(i) for i in range(len(cfg.block_out_channels))})
  return (f"U-Net channels {tuple(cfg.block_out_channels)}, {cfg.layers_per_block} resnet/level, attention at "
          f"{tuple(cfg.attention_levels)} + mid, {'/'.join(map(str, heads))} heads, groups {cfg.norm_num_groups}, "
          f"time embedding '{getattr(cfg, 'resnet_time_scale_shift', 'default')}', pooled text {cfg.pooled_dim}")


def count_params(tree_or_module) -> int:
  if hasattr(tree_or_module, "parameters"):
    return sum(p.numel() for p in tree_or_module.parameters())
  import jax
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree_or_module))


def random_inputs(batch: int, image_size: int, channels: int, text_len: int, text_dim: int, pooled_dim: int,
                  seed: int = 0) -> dict[str, np.ndarray]:
  """One fixed batch (NHWC numpy) that both frameworks consume: noisy images, time steps, text states, targets."""
  rng = np.random.default_rng(seed)
  out = dict(
      x=rng.standard_normal((batch, image_size, image_size, channels), np.float32),
      t=rng.integers(0, 1000, (batch,)).astype(np.int32),
      states=rng.standard_normal((batch, text_len, text_dim), np.float32),
      target=rng.standard_normal((batch, image_size, image_size, channels), np.float32))
  if pooled_dim:
    out["pooled"] = rng.standard_normal((batch, pooled_dim), np.float32)
  return out


def to_torch(inputs: dict[str, np.ndarray]) -> dict:
  """The same arrays for PyTorch: images NCHW, time steps int64."""
  import torch
  out = {}
  for k, v in inputs.items():
    if v.ndim == 4:
      v = np.ascontiguousarray(v.transpose(0, 3, 1, 2))
    out[k] = torch.from_numpy(v.astype(np.int64) if k == "t" else v)
  return out


def torch_fidelity_inception(features=("2048",)):
  """torch-fidelity's FeatureExtractorInceptionV3 (FID's TensorFlow InceptionV3 in PyTorch) at PyTorch's default
  initialisation, imported without the package's __init__ (which pulls in torchvision for its datasets) and built
  without its weight download. None when torch-fidelity is not installed."""
  import importlib
  import importlib.util
  import sys
  import types
  from unittest import mock
  spec = importlib.util.find_spec("torch_fidelity")
  if spec is None:
    return None
  if not hasattr(sys.modules.get("torch_fidelity"), "__path__"):
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = package
  module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
  with mock.patch.object(module, "load_state_dict_from_url", lambda *a, **k: {}), \
       mock.patch.object(module.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
    return module.FeatureExtractorInceptionV3("inception-v3-compat", list(features))
