"""The masked, weighted mean squared error that both training objectives (denoising, flow matching) end with."""
import jax
import jax.numpy as jnp


def example_weights(weights: jax.Array | None, batch: int) -> tuple[jax.Array, jax.Array]:
  """(keep [B] bool, float32 weights [B] that are 0 where not kept); None counts every example once."""
  if weights is None:
    weights = jnp.ones((batch,), jnp.float32)
  keep = weights > 0
  return keep, jnp.where(keep, weights.astype(jnp.float32), 0.0)


def drop_examples(x: jax.Array, keep: jax.Array) -> jax.Array:
  """`x` with the dropped examples zeroed. Dropped examples then never reach the model, so padding that holds garbage
  (or NaN) cannot leak into the loss or, through batch-coupled layers, into the other examples."""
  return jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x))


def mse(output: jax.Array, target: jax.Array, keep: jax.Array, weights: jax.Array,
        scale: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Σ weights · scale · MSE_per_example / Σ weights, and {'loss_per_example', 'weight_sum', 'denom'}.

  `scale` [B] re-weights examples (e.g. Min-SNR-γ) without changing the normaliser, so the loss keeps its scale
  whatever fraction of the batch is real.
  """
  if output.shape != target.shape:
    raise ValueError(f'model output shape {output.shape} does not match the target shape {target.shape}')
  # Squares in float32 even for bf16 models: the loss near t = 0 is tiny and bf16 would round it to noise.
  err = jnp.square(output.astype(jnp.float32) - target.astype(jnp.float32))
  loss_per_example = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
  weighted = loss_per_example if scale is None else loss_per_example * scale
  # Floor rather than max(., 1): fractional weights must not be rescaled; an all-zero mask gives loss 0 and zero
  # gradients instead of 0/0.
  weight_sum = jnp.sum(weights)
  denom = jnp.maximum(weight_sum, 1e-12)
  # where, not a product: 0 * NaN from a dropped example would still be NaN.
  loss = jnp.sum(jnp.where(keep, weights * weighted, 0.0)) / denom
  return loss, {'loss_per_example': loss_per_example, 'weight_sum': weight_sum, 'denom': denom}
