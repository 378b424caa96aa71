"""Spectral normalisation (Miyato et al. 2018): a layer whose kernel is divided by its largest singular value σ(W),
estimated by power iteration, so the layer is 1-Lipschitz.

As in SNGAN (and torch's `spectral_norm`), each training forward pass runs one power iteration from the vector `u`
kept from the last one, and stores the new `u`: across training steps the iteration converges while W moves slowly.
`u` is a `SpectralVector`, an `nnx.Variable` that is not a parameter — mutable state that the trainer carries and
checkpoints like batch statistics. In evaluation mode (`model.eval()`, which sets `use_running_average`) the stored
`u` is used as it is. u and v are constants of the gradient; σ = vᵀ W u is differentiated through W, as in the paper.

The wrapped layer may be any layer linear in its `kernel` (Linear, Conv, ConvTranspose, a one-hot embedding as a
bias-free Linear): layer(x; W/σ) = (layer(x; W) - b)/σ + b, so the layer runs unchanged and the division is applied
to its output.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_EPS = 1e-12


class SpectralVector(nnx.Variable):
  """The power iteration's estimate of the kernel's top right-singular vector (length: output features)."""


def _normalize(x: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x)), _EPS))


def kernel_matrix(kernel: jax.Array) -> jax.Array:
  """[..., out] kernel → [fan-in, out] matrix, the layout whose singular values bound the layer's gain."""
  return kernel.reshape(-1, kernel.shape[-1])


def power_iteration(matrix: jax.Array, u: jax.Array, iterations: int = 1) -> tuple[jax.Array, jax.Array]:
  """`iterations` (>= 1) steps of v = normalize(M u), u = normalize(Mᵀ v) from `u`; returns the new u and the
  last v (torch's order: σ = vᵀ M u pairs the new u with the v it was computed from)."""
  for _ in range(iterations):
    v = _normalize(matrix @ u)
    u = _normalize(matrix.T @ v)
  return u, v


class SpectralNorm(nnx.Module):
  """`layer` with its kernel divided by σ(kernel); see the module docstring."""

  def __init__(self, layer: nnx.Module, *, rngs: nnx.Rngs, iterations: int = 1):
    self.layer = layer
    out = layer.kernel.shape[-1]
    self.u = SpectralVector(_normalize(jax.random.normal(rngs.params(), (out,), jnp.float32)))
    self.iterations = iterations
    self.use_running_average = False  # set by model.train() / model.eval()

  def sigma(self, update: bool) -> jax.Array:
    """σ(W) = vᵀ W u, with u advanced by one power iteration (and stored) when `update`."""
    matrix = kernel_matrix(self.layer.kernel[...]).astype(jnp.float32)
    u = self.u[...]
    if update:
      u, v = power_iteration(jax.lax.stop_gradient(matrix), u, self.iterations)
      self.u[...] = u
    else:
      v = _normalize(jax.lax.stop_gradient(matrix) @ u)
    return v @ matrix @ u

  def __call__(self, x: jax.Array) -> jax.Array:
    sigma = self.sigma(update=not self.use_running_average)
    y = self.layer(x)
    bias = getattr(self.layer, "bias", None)
    if bias is None:
      return y / sigma.astype(y.dtype)
    b = bias[...].astype(y.dtype)
    return (y - b) / sigma.astype(y.dtype) + b


def maybe(layer: nnx.Module, enabled: bool, *, rngs: nnx.Rngs) -> nnx.Module:
  """`layer`, spectrally normalised when `enabled` (a discriminator's per-layer option)."""
  return SpectralNorm(layer, rngs=rngs) if enabled else layer
