"""Pieces every parity test against a PyTorch reference shares: one torch thread, perturbed reference weights and
the relative-error criterion. Import `one_torch_thread` into a test module to apply it there (an autouse fixture)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  # 2 shared cores: torch's thread pool fighting XLA's makes tiny forwards far slower.
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)


def perturbed(model, seed: int = 0, scale: float = 0.1):
  """`model` in eval mode with every parameter moved by scale * N(0, 1): diffusers and transformers start norms at
  1/0 and some projections at 0, which would hide a scale/bias mix-up or a missing layer."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn_like(p))
  return model.eval()


def max_rel_err(ours, ref) -> float:
  """max |ours - ref| / max |ref| in float64."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
