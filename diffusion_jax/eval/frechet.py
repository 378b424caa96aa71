"""Distribution-level scores on a judge network's features: the Fréchet distance (the formula of FID, Heusel et al.
2017) and a within-class diversity figure.

On MNIST the judge is the independent digit classifier (`eval.digit_classifier`), so the "domain Fréchet distance"
compares generated digits with the MNIST test split in that classifier's 256-d penultimate space — FID's recipe with
a network that has seen digits rather than ImageNet. Like FID it is biased upwards for small sample counts: compare
numbers measured with the same number of samples only.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg


def moments(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean [D], covariance [D, D]) of features [N, D] in float64."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < 2:
    raise ValueError(f"need features [N >= 2, D], got shape {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
  """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½): the squared 2-Wasserstein distance of the two Gaussians."""
  with warnings.catch_warnings():
    # ReLU features have dead units, so covariances are often singular; the finite check below is what matters.
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean, _ = scipy.linalg.sqrtm(sigma1 @ sigma2, disp=False)
  if not np.isfinite(covmean).all():
    # A singular product (fewer samples than dimensions): the usual remedy, a small ridge on both covariances.
    eps = np.eye(len(sigma1)) * 1e-6
    covmean = scipy.linalg.sqrtm((sigma1 + eps) @ (sigma2 + eps))
  covmean = np.real(covmean)  # rounding leaves tiny imaginary parts
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_between(features_a: np.ndarray, features_b: np.ndarray) -> float:
  return frechet_distance(*moments(features_a), *moments(features_b))


def within_class_diversity(features: np.ndarray, labels: np.ndarray) -> float:
  """The mean Euclidean distance between two different samples of the same class, averaged over classes: near 0 when
  a generator collapses to one image per class, as large as real data's when it covers the class."""
  features, labels = np.asarray(features, np.float64), np.asarray(labels)
  per_class = []
  for c in np.unique(labels):
    f = features[labels == c]
    if len(f) < 2:
      continue
    sq = np.sum(f * f, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * f @ f.T, 0.0)
    n = len(f)
    per_class.append(np.sqrt(d2)[~np.eye(n, dtype=bool)].mean())
  if not per_class:
    raise ValueError("within-class diversity needs two samples of some class")
  return float(np.mean(per_class))
