"""LPIPS-VGG (models/lpips.py) against the `lpips` package, and the autoencoder's perceptual term.

The reference is `lpips.LPIPS(net='vgg')` with the package's own learned projections (shipped in its wheel) and a
randomly initialised VGG-16 (`pnet_rand=True`: torchvision's ImageNet weights would need a download), saved the way
users save theirs (`python -m diffusion_jax.pretrained.lpips`: the state dict as safetensors).

lpips builds its VGG-16 with `torchvision.models.vgg16(...).features`. torchvision's PyPI wheel is built for CUDA
torch and does not import next to the CPU wheel, so lpips is installed without it and imported here with a stand-in
`torchvision.models.vgg16` that builds the same feature layers (torchvision's layout and indices: 3×3 convolutions
with padding 1, in-place ReLUs, 2×2 max-pools), removed again once lpips is imported.
"""
import os
import shutil
import sys
import types

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")


def _vgg16(pretrained=False, **unused):
  assert not pretrained, "the test builds a random VGG-16 (pnet_rand=True)"
  features, channels = [], 3
  for width in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
    if width == "M":
      features.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
    else:
      features += [torch.nn.Conv2d(channels, width, kernel_size=3, padding=1), torch.nn.ReLU(inplace=True)]
      channels = width
  return types.SimpleNamespace(features=torch.nn.Sequential(*features))


def _import_lpips():
  try:
    import torchvision  # noqa: F401  (a working torchvision: use it)
  except Exception:  # noqa: BLE001  (absent, or the CUDA wheel failing to load its operators)
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
      del sys.modules[name]
    stand_in = types.ModuleType("torchvision")
    stand_in.models = types.SimpleNamespace(vgg16=_vgg16)
    sys.modules["torchvision"] = stand_in
    try:
      return pytest.importorskip("lpips")
    finally:
      del sys.modules["torchvision"]
  return pytest.importorskip("lpips")


lpips = _import_lpips()

from configs import mnist_vae  # noqa: E402
from diffusion_jax.config import ConfigError  # noqa: E402
from diffusion_jax.pretrained.lpips import load_lpips  # noqa: E402
from diffusion_jax.pretrained.weights import WeightsError, save_safetensors  # noqa: E402
from diffusion_jax.train.metrics_writer import read_metrics  # noqa: E402
from diffusion_jax.train.trainer import Trainer  # noqa: E402


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  torch.manual_seed(0)
  model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  path = str(tmp_path_factory.mktemp("lpips") / "lpips_vgg.safetensors")
  save_safetensors(state, path)
  return model, state, path


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("size, channels", [(16, 3), (16, 1)])
def test_distance_matches_the_lpips_package(reference, size, channels):
  model, _, path = reference
  ours = load_lpips(path)
  rng = np.random.default_rng(size)
  x = rng.uniform(-1, 1, (3, size, size, channels)).astype(np.float32)
  y = np.clip(x + 0.5 * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
  with torch.no_grad():
    rgb = (lambda a: np.repeat(a, 3, axis=-1)) if channels == 1 else (lambda a: a)
    want = model(_nchw(rgb(x)), _nchw(rgb(y))).flatten().numpy()
  got = np.asarray(jax.jit(ours)(x, y))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
  assert np.all(want > 0) and np.all(np.asarray(ours(x, x)) == 0)


def test_bad_weight_files_are_one_line_errors(reference, tmp_path):
  _, state, _ = reference
  missing = dict(state)
  del missing["net.slice3.12.bias"]
  save_safetensors(missing, str(tmp_path / "missing.safetensors"))
  with pytest.raises(WeightsError, match="has no weight 'net.slice3.12.bias'"):
    load_lpips(str(tmp_path / "missing.safetensors"))
  alex = dict(state, **{"net.slice1.0.weight": np.zeros((64, 3, 11, 11), np.float32)})
  save_safetensors(alex, str(tmp_path / "alex.safetensors"))
  with pytest.raises(WeightsError, match="has shape"):
    load_lpips(str(tmp_path / "alex.safetensors"))
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, str(tmp_path / "lpips.pth"))
  with pytest.raises(WeightsError, match="pickle"):
    load_lpips(str(tmp_path / "lpips.pth"))
  assert load_lpips(str(tmp_path / "lpips.pth"), allow_pickle=True) is not None


def test_autoencoder_trains_with_a_frozen_perceptual_term(reference, tmp_path):
  _, state, path = reference
  weights_file = str(tmp_path / "lpips.safetensors")
  shutil.copy(path, weights_file)
  config = mnist_vae.get_config("tiny")
  config.data.image_size = 16
  config.mesh.shape = (1, 1, 1)
  config.vae.update(lpips_path=weights_file, perceptual_weight=0.5)
  config.train.update(steps=1, batch_size=4, eval_at_end=False, sample_at_end=False, checkpoint_every=1)
  workdir = str(tmp_path / "run")
  trainer = Trainer(config, workdir)
  trained = trainer.train()
  row = [r for r in read_metrics(workdir) if "train/perceptual" in r][0]
  assert row["train/perceptual"] > 0
  np.testing.assert_allclose(row["train/rec_loss"], row["train/pixel_loss"] + 0.5 * row["train/perceptual"],
                             rtol=1e-5)
  # The network is frozen: it holds the file's weights, and is no part of the trained state or the checkpoint.
  lpips_params = trainer.frozen.to_pure_dict()["lpips"]
  np.testing.assert_array_equal(np.asarray(lpips_params["lins"][3]["kernel"]),
                                state["lin3.model.1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(np.asarray(lpips_params["blocks"][4][2]["bias"]), state["net.slice5.28.bias"])
  assert list(trained.params) == ["vae"] and "lpips" not in trained.params["vae"].to_pure_dict()
  assert not any("lpips" in d for d in os.listdir(os.path.join(workdir, "checkpoints", "1", "params")))
  # A resumed run reads the file again (its fingerprint recorded): gone, it is refused in one line.
  os.rename(weights_file, weights_file + ".moved")
  config.train.update(steps=2, eval_at_end=True)
  config.evals.reconstruction.update(batch_size=8, max_examples=8)
  with pytest.raises(ConfigError, match=r"vae.lpips_path=.* has disappeared") as error:
    Trainer(config, workdir).train()
  assert "\n" not in str(error.value)
  # Back in place, the run resumes; its evaluation reports the reconstructions' LPIPS beside PSNR and SSIM.
  os.rename(weights_file + ".moved", weights_file)
  Trainer(config, workdir).train()
  assert [r["step"] for r in read_metrics(workdir) if "train/vae/perceptual" in r or "train/perceptual" in r] == [1, 2]
  final = read_metrics(workdir)[-1]
  assert final["eval/examples"] == 8 and final["eval/lpips"] > 0 and np.isfinite(final["eval/psnr"])
  # A run from scratch without the file says so in one line.
  os.remove(weights_file)
  with pytest.raises(ConfigError, match="vae.lpips_path=.* does not exist") as error:
    Trainer(config, str(tmp_path / "fresh")).train()
  assert "\n" not in str(error.value)
