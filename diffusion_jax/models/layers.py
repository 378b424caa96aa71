"""NNX building blocks that carry logical axis names on every parameter.

Every parameter gets a logical name so that data, FSDP and tensor parallelism are a change of the
logical→mesh rules in the config, never of model code. Names used across the models:
  'embed'   model width of a transformer / channels of a feature map
  'mlp'     hidden width of a feed-forward layer
  'heads'   attention projections (q/k/v output, out-proj input), split for tensor parallelism
  'vocab'   token embedding rows
  'conv_in', 'conv_out'  convolution kernel channels
  'norm'    scale/bias of normalisation layers
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any
_default_kernel = nnx.initializers.lecun_normal()
_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()


def _p(init, axes):
  return nnx.with_partitioning(init, tuple(axes))


class _LoRAHook:
  """`lora` is the layer's LoRA adapter once `models.lora.inject` gives it one; its output is added unless merged."""
  lora = None

  def _adapted(self, inputs: jax.Array, out: jax.Array) -> jax.Array:
    if self.lora is not None and not self.lora.merged:
      out = out + self.lora(inputs).astype(out.dtype)
    return out


class Linear(_LoRAHook, nnx.Linear):
  """nnx.Linear applied to its input flattened to [rows, features].

  Same parameters and result. On [B, N, D] inputs the kernel gradient contracts two dimensions at once, which
  XLA:CPU lowers to a loop far slower than one GEMM: flattening halves a DiT training step there (measured
  810 → 434 ms, batch 64 of configs/mnist_dit.py). Other backends see the same dot after their own canonicalisation.
  It takes a LoRA adapter (`_LoRAHook`).
  """

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if inputs.ndim <= 2:
      out = super().__call__(inputs)
    else:
      out = super().__call__(inputs.reshape(-1, inputs.shape[-1])).reshape(*inputs.shape[:-1], -1)
    return self._adapted(inputs, out)


def dense(in_features: int, out_features: int, axes: Sequence[Optional[str]], *, rngs: nnx.Rngs,
          use_bias: bool = True, dtype: Dtype = None, kernel_init=_default_kernel) -> Linear:
  return Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                kernel_init=_p(kernel_init, axes), bias_init=_p(_zeros, axes[-1:]), rngs=rngs)


class Conv(_LoRAHook, nnx.Conv):
  """nnx.Conv that takes a LoRA adapter (`_LoRAHook`).

  A 1×1 convolution with unit strides runs as the matmul it is. XLA:CPU computes its kernel gradient as a
  convolution whose window is the whole image; as one GEMM a U-Net shortcut's forward + backward (batch 64,
  28×28, 48 → 32 channels) went from 18.2 to 6.3 ms on the 2-core CPU (`python -m benchmarks.cpu_kernels`).
  """

  def _pointwise(self) -> bool:
    ones = lambda v: v is None or all(d == 1 for d in ((v,) if isinstance(v, int) else v))
    return (all(k == 1 for k in self.kernel_size) and ones(self.strides) and ones(self.input_dilation)
            and ones(self.kernel_dilation) and self.feature_group_count == 1 and self.mask is None
            and (self.padding in ("SAME", "VALID") or not isinstance(self.padding, str)
                 and not any(jax.tree.leaves(self.padding))))

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if not self._pointwise():
      return self._adapted(inputs, super().__call__(inputs))
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    x, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    out = jnp.dot(x.reshape(-1, x.shape[-1]), kernel.reshape(kernel.shape[-2:]), precision=self.precision)
    if bias is not None:
      out = out + bias
    return self._adapted(inputs, out.reshape(*x.shape[:-1], -1))


def conv(in_features: int, out_features: int, kernel_size: int = 3, *, rngs: nnx.Rngs, strides: int = 1,
         padding: Any = "SAME", dtype: Dtype = None, kernel_init=_default_kernel, use_bias: bool = True) -> Conv:
  """NHWC convolution with the diffusers padding convention (k//2 on every side)."""
  if padding == "SAME" and strides != 1:
    # PyTorch pads symmetrically (k//2) for strided convs; XLA's SAME pads asymmetrically. Match PyTorch so
    # downsampling layers see the same pixels as the reference implementations.
    padding = ((kernel_size // 2, kernel_size // 2),) * 2
  return Conv(in_features, out_features, (kernel_size, kernel_size), strides=strides, padding=padding,
              dtype=dtype, kernel_init=_p(kernel_init, (None, None, "conv_in", "conv_out")),
              bias_init=_p(_zeros, ("conv_out",)), use_bias=use_bias, rngs=rngs)


def conv_transpose(in_features: int, out_features: int, kernel_size: int = 4, *, rngs: nnx.Rngs, strides: int = 2,
                   dtype: Dtype = None, kernel_init=_default_kernel, use_bias: bool = True) -> nnx.ConvTranspose:
  """NHWC transposed convolution; 'SAME' padding makes the output exactly `strides` times the input (DCGAN's k=4,
  s=2, p=1 upsampling; a small decoder's ×2 upsampling that computes at the input's resolution rather than the
  output's, where nearest-upsample + conv costs 4× as much)."""
  return nnx.ConvTranspose(in_features, out_features, (kernel_size, kernel_size), strides=strides, padding="SAME",
                           dtype=dtype, kernel_init=_p(kernel_init, (None, None, "conv_in", "conv_out")),
                           bias_init=_p(_zeros, ("conv_out",)), use_bias=use_bias, rngs=rngs)


def batch_norm(num_features: int, *, rngs: nnx.Rngs, momentum: float = 0.9, epsilon: float = 1e-5,
               dtype: Dtype = None, affine: bool = True) -> nnx.BatchNorm:
  """BatchNorm over every axis but the last; its running mean/variance are mutable state (`train.parts`). Without
  `affine` it has no scale or shift of its own (a conditional norm brings them)."""
  return nnx.BatchNorm(num_features, momentum=momentum, epsilon=epsilon, dtype=dtype, use_scale=affine,
                       use_bias=affine, scale_init=_p(_ones, ("norm",)), bias_init=_p(_zeros, ("norm",)), rngs=rngs)


class GroupNorm(nnx.GroupNorm):
  """nnx.GroupNorm (same parameters, same E[x²] - E[x]² statistics) computed in the order a CPU likes.

  nnx reshapes [B, H, W, C] to [B, H, W, G, C/G] and reduces over three axes at once, then normalises with a
  subtract, a multiply and an add per element. Here the sums run over the positions first, into [B, C] with the
  channels contiguous, the groups are summed on that small array, and the normalisation is one multiply-add per
  element with per-(example, channel) coefficients. A U-Net group norm + SiLU forward at batch 64, 28×28×16, went
  from 1.15 to 0.29 ms on the 2-core CPU (`python -m benchmarks.cpu_kernels`). Masks and custom reduction axes
  take nnx's path.
  """

  def __call__(self, x, *, mask: Optional[jax.Array] = None):
    if mask is not None or self.reduction_axes is not None or x.ndim < 3:
      return super().__call__(x, mask=mask)
    scale = self.scale[...] if self.scale else None
    bias = self.bias[...] if self.bias else None
    x, scale, bias = self.promote_dtype((x, scale, bias), dtype=self.dtype)
    c, groups = x.shape[-1], self.num_groups
    per_group = c // groups
    positions = tuple(range(1, x.ndim - 1))
    xf = x.astype(jnp.float32)
    count = math.prod(x.shape[1:-1]) * per_group
    group_sum = lambda t: t.sum(positions).reshape(x.shape[0], groups, per_group).sum(-1) / count
    mean = group_sum(xf)
    var = jnp.maximum(group_sum(jnp.square(xf)) - jnp.square(mean), 0.0)
    per_channel = lambda t: jnp.repeat(t, per_group, axis=1)
    a = per_channel(jax.lax.rsqrt(var + self.epsilon))
    if scale is not None:
      a = a * scale.astype(jnp.float32)
    b = -per_channel(mean) * a
    if bias is not None:
      b = b + bias.astype(jnp.float32)
    expand = (slice(None),) + (None,) * len(positions) + (slice(None),)
    return (xf * a[expand] + b[expand]).astype(x.dtype)


def group_norm(num_features: int, num_groups: int = 32, *, rngs: nnx.Rngs, epsilon: float = 1e-5,
               dtype: Dtype = None) -> GroupNorm:
  return GroupNorm(num_features, num_groups=min(num_groups, num_features), epsilon=epsilon, dtype=dtype,
                   scale_init=_p(_ones, ("norm",)), bias_init=_p(_zeros, ("norm",)), rngs=rngs)


def layer_norm(num_features: int, *, rngs: nnx.Rngs, epsilon: float = 1e-5, dtype: Dtype = None) -> nnx.LayerNorm:
  return nnx.LayerNorm(num_features, epsilon=epsilon, dtype=dtype, scale_init=_p(_ones, ("norm",)),
                       bias_init=_p(_zeros, ("norm",)), rngs=rngs)


def rms_norm(num_features: int, *, rngs: nnx.Rngs, epsilon: float = 1e-6, dtype: Dtype = None) -> nnx.RMSNorm:
  return nnx.RMSNorm(num_features, epsilon=epsilon, dtype=dtype, scale_init=_p(_ones, ("norm",)), rngs=rngs)


class Embed(_LoRAHook, nnx.Embed):
  """nnx.Embed that takes a LoRA adapter (`_LoRAHook`), added to the looked-up rows; `attend`, a tied output head's
  use of the table, reads the base table only."""

  def __call__(self, inputs: jax.Array) -> jax.Array:
    return self._adapted(inputs, super().__call__(inputs))


def embed(num_embeddings: int, features: int, *, rngs: nnx.Rngs, dtype: Dtype = None, stddev: float = 0.02) -> Embed:
  return Embed(num_embeddings, features, dtype=dtype,
               embedding_init=_p(nnx.initializers.normal(stddev), ("vocab", "embed")), rngs=rngs)


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = True,
                       downscale_freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) time steps, the diffusers `Timesteps` convention."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class GEGLU(nnx.Module):
  """Gated GELU projection (Shazeer 2020), the feed-forward input of Stable Diffusion's transformer blocks."""

  def __init__(self, dim_in: int, dim_out: int, *, rngs: nnx.Rngs, dtype: Dtype = None):
    self.proj = dense(dim_in, dim_out * 2, ("embed", "mlp"), rngs=rngs, dtype=dtype)

  def __call__(self, x):
    h, gate = jnp.split(self.proj(x), 2, axis=-1)
    return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
  def __init__(self, dim: int, *, mult: int = 4, rngs: nnx.Rngs, dtype: Dtype = None):
    self.geglu = GEGLU(dim, dim * mult, rngs=rngs, dtype=dtype)
    self.out = dense(dim * mult, dim, ("mlp", "embed"), rngs=rngs, dtype=dtype)

  def __call__(self, x):
    return self.out(self.geglu(x))
