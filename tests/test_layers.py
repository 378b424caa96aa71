"""`layers.GroupNorm` and `layers.Conv`'s 1×1 path compute what nnx's layers compute, values and gradients, with
the same parameters; only the order of the arithmetic changed (for speed on CPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_jax.models import layers


def _randomise(module, seed=1):
  for i, (_, var) in enumerate(nnx.state(module, nnx.Param).flat_state()):
    var[...] = jax.random.normal(jax.random.key(seed + i), var[...].shape)
  return module


def _check_same(ours, reference, x, atol):
  graphdef, params, rest = nnx.split(ours, nnx.Param, ...)

  def run(call):
    return lambda p, x: call(nnx.merge(graphdef, p, rest), x)

  f_ours, f_ref = run(lambda m, x: m(x)), run(reference)
  np.testing.assert_allclose(f_ours(params, x), f_ref(params, x), atol=atol)
  loss = lambda f: jax.grad(lambda p, x: jnp.sum(jnp.sin(f(p, x))), argnums=(0, 1))(params, x)
  (gp_ours, gx_ours), (gp_ref, gx_ref) = loss(f_ours), loss(f_ref)
  np.testing.assert_allclose(gx_ours, gx_ref, atol=atol)
  for a, b in zip(jax.tree.leaves(gp_ours), jax.tree.leaves(gp_ref)):
    np.testing.assert_allclose(a, b, atol=atol * 50, rtol=1e-4)  # summed over every position


@pytest.mark.parametrize("shape,groups", [((2, 5, 6, 16), 4), ((3, 7, 12), 3), ((2, 4, 4, 8), 8)])
def test_group_norm_equals_nnx_group_norm(shape, groups):
  norm = _randomise(layers.group_norm(shape[-1], groups, rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(0), shape) * 3 + 2
  _check_same(norm, nnx.GroupNorm.__call__, x, atol=2e-5)


def test_group_norm_keeps_nnx_dtype_and_mask_behaviour():
  norm = layers.group_norm(8, 4, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 8))
  assert norm(x).dtype == nnx.GroupNorm.__call__(norm, x).dtype == jnp.bfloat16
  mask = jnp.ones(x.shape, bool).at[:, 0].set(False)  # a mask takes nnx's own path
  np.testing.assert_array_equal(norm(x, mask=mask), nnx.GroupNorm.__call__(norm, x, mask=mask))


@pytest.mark.parametrize("kwargs", [dict(kernel_size=1), dict(kernel_size=1, use_bias=False),
                                    dict(kernel_size=1, padding=((0, 0), (0, 0)))])
def test_pointwise_conv_is_a_matmul_equal_to_nnx_conv(kwargs):
  conv = _randomise(layers.conv(8, 4, rngs=nnx.Rngs(0), **kwargs))
  assert conv._pointwise()
  _check_same(conv, nnx.Conv.__call__, jax.random.normal(jax.random.key(0), (2, 5, 6, 8)), atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=1, strides=2), dict(kernel_size=3)])
def test_other_convs_keep_nnx_path(kwargs):
  assert not layers.conv(8, 4, rngs=nnx.Rngs(0), **kwargs)._pointwise()
