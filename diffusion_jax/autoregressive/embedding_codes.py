"""Continuous embeddings as short token sequences, as DALL-E 2's autoregressive prior reads them (section 2.1).

  codes = EmbeddingCodes.fit(embeddings, components=16, bins=64)   # numpy [N, D], fitted once
  tokens = codes.encode(x)        # [B, D] → int32 [B, components], each in [0, bins)
  x_hat = codes.decode(tokens)    # → [B, D]: bucket centres, then the inverse PCA

The embedding is centred and projected onto its first `components` principal directions (largest variance first, so
a model reading them in order decides the coarse shape of the embedding before the details), and each coefficient is
cut into `bins` equal-mass buckets: the edges are that coefficient's quantiles over the fitted data, so every token of
a dimension is equally frequent in training and the buckets are finest where the data are densest. A bucket decodes to
the mean of the fitted coefficients that fell in it (the squared-error-optimal value for those edges).

`encode` and `decode` are jnp and traceable (the record's arrays become constants); `to_record` / `from_record` give
the JSON-able form a run keeps next to its checkpoints.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class EmbeddingCodes:
  mean: np.ndarray  # [D]
  components: np.ndarray  # [C, D], orthonormal rows, by decreasing variance
  edges: np.ndarray  # [C, bins + 1]: each coefficient's bucket edges, the lowest and highest fitted values at the ends
  centres: np.ndarray  # [C, bins]: what each bucket decodes to
  explained_variance_ratio: np.ndarray  # [C]: each component's share of the embeddings' total variance

  @property
  def bins(self) -> int:
    return self.centres.shape[1]

  @property
  def num_components(self) -> int:
    return self.components.shape[0]

  @classmethod
  def fit(cls, x: np.ndarray, components: int, bins: int) -> "EmbeddingCodes":
    x = np.asarray(x, np.float64)
    n, d = x.shape
    if not 1 <= components <= min(n, d) or bins < 2:
      raise ValueError(f"need 1 <= components <= min(examples, dim) = {min(n, d)} and bins >= 2; got {components} "
                       f"and {bins}")
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    variance = s ** 2
    basis = vt[:components]
    z = (x - mean) @ basis.T
    edges = np.quantile(z, np.linspace(0.0, 1.0, bins + 1), axis=0).T  # [C, bins + 1]
    centres = np.empty((components, bins))
    for i in range(components):
      which = _bucket(z[:, i], edges[i])
      sums, counts = np.bincount(which, z[:, i], bins), np.bincount(which, minlength=bins)
      middle = (edges[i, :-1] + edges[i, 1:]) / 2  # a bucket no example fell in (ties at an edge)
      centres[i] = np.where(counts > 0, sums / np.maximum(counts, 1), middle)
    f32 = lambda a: np.asarray(a, np.float32)
    return cls(f32(mean), f32(basis), f32(edges), f32(centres), f32(variance[:components] / variance.sum()))

  def encode(self, x: jax.Array) -> jax.Array:
    """Embeddings [..., D] → bucket ids int32 [..., C]."""
    z = (jnp.asarray(x, jnp.float32) - self.mean) @ self.components.T
    return jnp.sum(z[..., None] > self.edges[:, 1:-1], axis=-1).astype(jnp.int32)

  def decode(self, codes: jax.Array) -> jax.Array:
    """Bucket ids [..., C] → embeddings [..., D] (float32)."""
    z = jnp.asarray(self.centres)[jnp.arange(self.num_components), codes]
    return z @ self.components + self.mean

  def to_record(self) -> dict:
    record = {f.name: getattr(self, f.name).tolist() for f in dataclasses.fields(self)}
    record["explained_variance"] = float(np.sum(self.explained_variance_ratio))
    return record

  @classmethod
  def from_record(cls, record: dict) -> "EmbeddingCodes":
    return cls(**{f.name: np.asarray(record[f.name], np.float32) for f in dataclasses.fields(cls)})


def _bucket(z: np.ndarray, edges: np.ndarray) -> np.ndarray:
  """`encode`'s bucket of each value of one coefficient (numpy, for fitting)."""
  return np.sum(z[:, None] > edges[None, 1:-1], axis=1)


__all__ = ["EmbeddingCodes"]
